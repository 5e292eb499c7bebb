"""Rank bodies and shared helpers for the `ActivationCheckpoint` tests and benchmark.

Each body runs the same step with and without checkpointing on the same rank and returns both,
so the parent can assert that checkpointing changes nothing (ranks never assert).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils._python_dispatch import TorchDispatchMode

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.passes.activation_checkpoint.api import ActivationCheckpoint
from moetx.passes.expert_parallel.api import ExpertParallel
from moetx.passes.fsdp.api import FSDP
from moetx.passes.load_sync import sync_routing_load
from moetx.structure.discovery import discover
from moetx.testing.parity import gradients
from moetx.testing.ranks import cached
from moetx.testing.train import TrainSpec, build_model, global_batches, mesh_for

__all__ = [
    "COLLECTIVES",
    "CollectiveCounter",
    "ep_step",
    "ep_step_times",
    "fully_shard_step",
    "load_counters",
    "pipeline_step",
    "rank_rows",
]


COLLECTIVES = ("all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce")
"""Functional collectives `CollectiveCounter` counts (`_c10d_functional.<name>`)."""


class CollectiveCounter(TorchDispatchMode):
    """Counts functional collectives (`COLLECTIVES`) by name and payload kind.

    Ops replayed from a selective-checkpoint cache never reach this mode, so a recomputation
    that re-issues an all-to-all shows up as an extra call and one served from the cache
    does not. Keys read `all_to_all_single[int64]` (the count exchange) or `[data]`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._overloadpacket.__name__
        if func.namespace == "_c10d_functional" and name in COLLECTIVES:
            kind = "int64" if args[0].dtype == torch.int64 else "data"
            self.calls[f"{name}[{kind}]"] += 1
        return func(*args, **(kwargs or {}))


def load_counters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every router load counter (`expert_load` buffer) by MoE-layer FQN, cloned."""
    out = {}
    for layer in discover(model).moe_layers():
        load = getattr(layer.router, "expert_load", None)
        if load is not None:
            out[layer.fqn] = load.detach().clone()
    return out


def rank_rows(spec: TrainSpec, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the first global batch: `(input_ids, labels)`."""
    ids, labels = global_batches(spec, world_size)[0]
    r = dist.get_rank()
    rows = slice(r * spec.rows_per_rank, (r + 1) * spec.rows_per_rank)
    return ids[rows], labels[rows]


def _step(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    out = model(ids, labels=labels)
    backward = CollectiveCounter()
    with backward:
        out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "logits": out.logits.detach(),
        "grads": gradients(model),
        "loads": load_counters(model),
        "backward_collectives": dict(backward.calls),
    }


def ep_step(spec: TrainSpec, modes: tuple[str, ...], every: int = 1) -> dict[str, Any]:
    """Rank body: one step of `ExpertParallel()` (ep = world size), then one of
    `ExpertParallel() | ActivationCheckpoint(mode=m, every=every)` for each mode `m`.

    Returns `{"plain": ..., m: ...}`, each with loss, logits, full gradients, load counters and
    the functional collectives issued during backward.
    """
    ws = dist.get_world_size()
    mesh = mesh_for(MeshDegrees(dp_shard=ws, ep=ws))
    ids, labels = rank_rows(spec, ws)
    model = ExpertParallel().apply(build_model(spec), mesh)
    results = {"plain": _step(model, ids, labels)}
    for mode in modes:
        pipeline = ExpertParallel() | ActivationCheckpoint(mode=mode, every=every)
        results[mode] = _step(pipeline.apply(build_model(spec), mesh), ids, labels)
    return results


def fully_shard_step(spec: TrainSpec, modes: tuple[str, ...]) -> dict[str, Any]:
    """Rank body: FSDP2 `fully_shard` on every block, then the root, over all ranks; one step
    on this rank's rows, first without checkpointing ("plain"), then after
    `ActivationCheckpoint(mode=m)` for each mode `m`.

    Returns `{"plain": ..., m: ...}` like `ep_step`, plus the blocks' class names.
    """
    ws = dist.get_world_size()
    mesh = cached(("activation_checkpoint.world", ws), lambda: init_device_mesh("cpu", (ws,)))
    ids, labels = rank_rows(spec, ws)
    results = {}
    pmesh = mesh_for(MeshDegrees(dp_shard=ws))
    for mode in (None, *modes):
        model = build_model(spec)
        if mode is not None:  # (it sums the load counters over the ranks, as the call below)
            model = ActivationCheckpoint(mode=mode).apply(model, pmesh)
        sync_routing_load(model, pmesh)
        for block in discover(model).blocks:
            fully_shard(block.module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        result = _step(model, ids, labels)
        result["classes"] = [type(b.module).__name__ for b in discover(model).blocks]
        results[mode or "plain"] = result
    return results


def pipeline_step(spec: TrainSpec, modes: tuple[str, ...], fsdp: dict[str, Any]) -> dict[str, Any]:
    """Rank body: `ExpertParallel() | FSDP(**fsdp)` ("plain") and, for each mode `m`,
    `ExpertParallel() | ActivationCheckpoint(mode=m) | FSDP(**fsdp)` (ep = world size); one
    step each on this rank's rows. Returns `{"plain": ..., m: ...}` like `ep_step`.
    """

    ws = dist.get_world_size()
    mesh = mesh_for(MeshDegrees(dp_shard=ws, ep=ws))
    ids, labels = rank_rows(spec, ws)
    results = {}
    for mode in (None, *modes):
        passes: list[Any] = [ExpertParallel(), FSDP(**fsdp)]
        if mode is not None:
            passes.insert(1, ActivationCheckpoint(mode=mode))
        model = Pipeline(tuple(passes)).apply(build_model(spec), mesh)
        results[mode or "plain"] = _step(model, ids, labels)
    return results


def ep_step_times(
    spec: TrainSpec, modes: tuple[str | None, ...], *, warmup: int, steps: int
) -> dict[str | None, float]:
    """Rank body for `benchmarks/activation_memory.py`: median seconds of one EP fwd+bwd step
    per mode (`ExpertParallel()`, plus `ActivationCheckpoint(mode=m)` unless `m` is None).

    Steps of the modes are interleaved (one of each per round), so load on a shared machine
    affects every mode alike.
    """
    ws = dist.get_world_size()
    mesh = mesh_for(MeshDegrees(dp_shard=ws, ep=ws))
    models = {}
    for mode in modes:
        passes: tuple[Any, ...] = (ExpertParallel(),)
        if mode is not None:
            passes += (ActivationCheckpoint(mode=mode),)
        models[mode] = Pipeline(passes).apply(build_model(spec), mesh)
    ids, labels = rank_rows(spec, ws)
    times: dict[str | None, list[float]] = {m: [] for m in modes}
    for i in range(warmup + steps):
        for mode, model in models.items():
            dist.barrier()
            begin = time.perf_counter()
            model(ids, labels=labels).loss.backward()
            if i >= warmup:
                times[mode].append(time.perf_counter() - begin)
    return {m: sorted(t)[len(t) // 2] for m, t in times.items()}
