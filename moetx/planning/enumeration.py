"""The candidates `autoplan` weighs: every legal mesh for a world and the pipelines on each."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence

from moetx.core.algebra import Pass, Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.passes import (
    FSDP,
    ActivationCheckpoint,
    ContextParallel,
    ExpertParallel,
    TensorParallel,
)
from moetx.planning.predict_state import ModelShapes

__all__ = ["ac_pass", "degree_options", "dispatchers", "pipelines"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _factorisations(world: int, axes: int) -> Iterator[tuple[int, ...]]:
    """Ordered tuples of `axes` positive ints whose product is `world` (add `tp` as one more)."""
    if axes == 1:
        yield (world,)
        return
    for d in _divisors(world):
        for rest in _factorisations(world // d, axes - 1):
            yield (d, *rest)


def degree_options(
    world: int,
    *,
    shapes: ModelShapes,
    seq: int,
    allowed: frozenset[str],
    max_cp: int,
    max_tp: int,
) -> Iterator[MeshDegrees]:
    """Every factorisation of `world` into dp_replicate × cp × dp_shard × tp (tp innermost,
    dividing every head count, MLP width and the vocabulary; cp dividing `seq / 2`), and every
    ep dividing dp_shard × cp and the expert count, among the `allowed` passes."""
    experts = shapes.num_experts
    for dp_replicate, cp, dp_shard, tp in _factorisations(world, 4):  # tp innermost
        if tp > 1 and ("tp" not in allowed or tp > max_tp or not shapes.tp_legal(tp)):
            continue
        if dp_replicate > 1 and "fsdp" not in allowed:
            continue  # without FSDP, replicas and shards are the same data parallelism
        if cp > 1 and ("cp" not in allowed or cp > max_cp or seq % (2 * cp)):
            continue
        for ep in _divisors(dp_shard * cp):
            if ep > 1 and ("ep" not in allowed or not experts or experts % ep):
                continue
            yield MeshDegrees(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, ep=ep, tp=tp)


@functools.lru_cache(maxsize=64)
def ac_pass(mode: str) -> ActivationCheckpoint | None:
    """The pass for a checkpointing choice (`"none"`, a mode, or `"mode/n"`: every n-th block)."""
    if mode == "none":
        return None
    name, _, every = mode.partition("/")
    return ActivationCheckpoint(mode=name, every=int(every or 1))


def dispatchers(ep: int, top_k: int) -> tuple[str, ...]:
    """The token dispatchers worth trying at expert-parallel degree `ep`.

    All-to-all always. All-gather only when `ep < top_k`: it sends every token to every other
    rank, `(ep - 1)·T` rows each way, where all-to-all sends the `T·k·(ep - 1)/ep` copies bound
    elsewhere, so it sends fewer bytes only when `ep < k`; it also issues more collectives and
    keeps the gathered tokens, so elsewhere it loses on every count.
    """
    return ("all_to_all", "all_gather") if ep < top_k else ("all_to_all",)


def pipelines(
    d: MeshDegrees,
    allowed: frozenset[str],
    modes: Sequence[str],
    fsdps: Sequence[FSDP],
    top_k: int = 0,
) -> Iterator[Pipeline]:
    """The pipelines for mesh `d`: tp (with and without sequence parallelism), cp (all-gather and
    ring) and ep (with each of `dispatchers(d.ep, top_k)`) whenever their degree is above 1, each
    allowed checkpointing mode, each FSDP option or none."""
    options: list[FSDP | None] = [*fsdps, None] if "fsdp" in allowed else [None]
    eps = [ExpertParallel(dispatcher=n) for n in dispatchers(d.ep, top_k)] if d.ep > 1 else [None]
    # ring CP keeps one K/V block where all-gather CP keeps them all; sequence parallelism
    # shards the residual stream for the same bytes: both can fit where the plain ones do not
    cps = [ContextParallel(), ContextParallel(comm="p2p")] if d.cp > 1 else [None]
    tps = [TensorParallel(), TensorParallel(sequence_parallel=True)] if d.tp > 1 else [None]
    ac_modes = modes if "ac" in allowed else ["none"]
    for tp, cp, ep, mode, fsdp in itertools.product(tps, cps, eps, ac_modes, options):
        if d.dp_replicate > 1 and fsdp is None:
            continue
        passes: list[Pass | None] = [
            tp,
            cp,
            ep,
            ac_pass(mode),
            fsdp,
        ]
        yield _pipeline(tuple(p for p in passes if p is not None))


@functools.lru_cache(maxsize=4096)
def _pipeline(passes: tuple[Pass, ...]) -> Pipeline:
    """One (frozen) `Pipeline` per distinct pass tuple: building one checks the order and
    options, and the same few hundred recur on every mesh (tens of thousands of candidates)."""
    return Pipeline(passes)
