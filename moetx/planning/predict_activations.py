"""Activation bytes and forward FLOPs per rank, traced on `meta`: the model's own forward, not a formula.

`trace_blocks` runs one forward of a (shallow copy of the) model on the `meta` device under
`TracingMeter`, a `LiveActivationMeter` that also

- tags every op output with the transformer block that made it (forward hooks), so the bytes a
  forward leaves alive split into "outside blocks" (embedding, final norm, logits' loss) and per
  block kind (dense, MoE, MTP), checkpointed or not, and a model of any depth is then the sum;
- routes tokens uniformly: on `meta` the router's choices have no values, so the routed ids
  get CPU twins of a balanced router's (`moetx.planning.meta_values`: `T·k / E` copies per
  expert), and what the host reads of them (split sizes, counts) has values; every other op
  runs as on a device;
- runs Hugging Face models as they are: their one data-dependent branch (the packed-sequence
  check, a 0-dim `.all()`) answers "plain", and their CPU `_grouped_mm` gets a meta output;
- runs attention through the flash kernel's meta function (saves the output and the
  log-sum-exp, as the CPU and GPU flash kernels do; on `meta` SDPA would pick the math path);
- counts forward FLOPs with `torch.utils.flop_counter`'s formulas (matmuls, attention), and per
  block what a recomputation would rerun: the ops before the block's last saved tensor (a
  `saved_tensors_hooks` pack), where non-reentrant checkpointing stops recomputing.

With `ContextParallel` the trace runs on a fake world of cp ranks (as its last, most loaded cp
rank), on the rank's local sequence, with the pass applied, so what CP attention keeps (the
gathered K/V; the ring's own block) is in the count; the fake backend also serves `meta`
tensors, so the ring's point-to-point sends trace. With `TensorParallel` likewise on a world of
tp ranks (a rank's heads and MLP columns; with sequence parallelism its part of the residual
stream; FLOPs those of the local kernels DTensor runs, see `trace_meter`), and with `ExpertParallel` on `ep_trace_degree` ranks (what its dispatch keeps). Meta ops
take microseconds whatever their size, so a DeepSeek-V3 block traces at full width and length.
The bytes match `LiveActivationMeter` on a real CPU forward (tests: within 0.1% on small models).
"""

from __future__ import annotations

import gc
from collections import Counter, defaultdict
from typing import Any

import attrs
import torch
from torch import nn

from moetx.core.algebra import Pass, Pipeline
from moetx.core.errors import PlanningError
from moetx.mesh.parallel_mesh import MeshDegrees, ParallelMesh
from moetx.models import MoEConfig
from moetx.passes import ActivationCheckpoint
from moetx.passes.activation_checkpoint import MODES
from moetx.planning.meta_env import flash_blocks, meta_world
from moetx.planning.plan import _meta_model
from moetx.planning.trace_meter import OUTSIDE, FlashOnMeta, TracingMeter
from moetx.structure.discovery import discover
from moetx.structure.hf import hf_model_type

__all__ = ["BlockTrace", "ep_trace_degree", "trace_blocks"]


@attrs.frozen
class BlockTrace:
    """What one traced forward left alive, per block kind, and its forward FLOPs.

    Attributes:
        outside: Bytes made outside every block (embeddings, final norm, loss), kept after
            forward; the logits and the loss value excluded.
        blocks: Bytes kept per block kind (`dense`, `moe`, `mtp`).
        flops_outside: Forward FLOPs outside blocks (lm head, embeddings).
        flops: Forward FLOPs per block kind.
        expert_flops: The part of a MoE block's FLOPs spent in routed experts (scales with load).
        recompute_flops: Per checkpoint mode (`MODES`) and block kind, the FLOPs recomputing the
            block reruns: its ops up to its last saved tensor (non-reentrant `checkpoint` stops
            there; autograd saves an op's inputs before it runs and its outputs after), less
            those the mode's caches answer (a router's; "selective": also `SAVED_OPS`).
        recompute_expert_flops: The part of those spent in routed experts.
    """

    outside: int
    blocks: dict[str, int]
    flops_outside: int
    flops: dict[str, int]
    expert_flops: int
    recompute_flops: dict[str, dict[str, int]]
    recompute_expert_flops: dict[str, dict[str, int]]


def ep_trace_degree(ep: Pass | None, degree: int, experts: int) -> int:
    """The ep degree to trace `ep` at `degree` with: for the all-to-all dispatcher the largest
    divisor of the expert count up to 16 (under a balanced router every rank receives `T·k`
    copies whatever the degree, so one trace serves every degree, and few local experts make it
    quick), for the all-gather one the degree itself (a rank gathers all `D·T` tokens); 1
    without expert parallelism."""
    if ep is None or degree <= 1:
        return 1
    if getattr(ep, "dispatcher", "all_to_all") == "all_gather":
        return degree
    return max(d for d in range(2, min(experts, 16) + 1) if experts % d == 0)


def _shallow(config: MoEConfig) -> MoEConfig:
    """The config with at most two blocks of a kind (MTP kept): the first of each kind is then
    followed by a block, as almost every block of the real model is (which keeps its output)."""
    moe = min(config.num_moe_layers, 2)
    dense = min(config.num_dense_layers, 1 if moe else 2)
    return attrs.evolve(config, num_dense_layers=dense, num_layers=dense + moe)


def _hook(meter: TracingMeter, index: int) -> list[Any]:
    stack: list[int] = []

    def pre(module: nn.Module, args: Any) -> None:
        stack.append(meter.block)
        meter.block = index

    def post(module: nn.Module, args: Any, out: Any) -> None:
        meter.block = stack.pop()

    return [pre, post]


#: What a meta forward raises where a model cannot be traced; `trace_blocks` reports these as a
#: `PlanningError` ("cannot trace").
UNTRACEABLE = (RuntimeError, NotImplementedError, TypeError)


def traced_model(model: nn.Module | MoEConfig) -> nn.Module:
    """The fresh meta model a trace applies its passes to (a config: at most one dense and one
    MoE block)."""
    return _meta_model(_shallow(model) if isinstance(model, MoEConfig) else model)


def traced_pipeline(
    ac: Pass | None, cp: Pass | None, cp_degree: int, tp: Pass | None, tp_degree: int,
    ep: Pass | None, ep_degree: int,
) -> tuple[tuple[Pass, ...], MeshDegrees]:  # fmt: skip
    """The passes a trace applies, in pipeline order, and its fake world's mesh degrees: a pass
    at degree 1 is left out (CP, TP, EP), checkpointing covers every block."""
    cp_degree = cp_degree if cp is not None else 1
    tp_degree = tp_degree if tp is not None else 1
    ep_degree = ep_degree if ep is not None else 1
    if isinstance(ac, ActivationCheckpoint):
        ac = attrs.evolve(ac, every=1)
    kept = [tp if tp_degree > 1 else None, cp if cp_degree > 1 else None]
    passes = tuple(p for p in [*kept, ep if ep_degree > 1 else None, ac] if p is not None)
    return passes, MeshDegrees(dp_shard=ep_degree, cp=cp_degree, ep=ep_degree, tp=tp_degree)


def trace_blocks(
    model: nn.Module | MoEConfig,
    *,
    micro_batch: int,
    seq: int,
    ac: Pass | None = None,
    cp: Pass | None = None,
    cp_degree: int = 1,
    tp: Pass | None = None,
    tp_degree: int = 1,
    ep: Pass | None = None,
    ep_degree: int = 1,
) -> BlockTrace:
    """Trace one forward on `meta` (see the module docstring) and split what it keeps per block.

    Args:
        model: A `MoEConfig` (traced with at most one dense and one MoE block), or a
            `MoETransformer`-like module (a meta copy of the whole model is traced).
        micro_batch: Rows per rank.
        seq: Global sequence length (each rank holds `seq / cp_degree` of it under CP).
        ac: The `ActivationCheckpoint` pass, applied to every block (None: no checkpointing).
        cp: The `ContextParallel` pass (None: none).
        cp_degree: Its degree.
        tp: The `TensorParallel` pass (None: none): the trace runs on tp rank 0 of a fake
            world with it applied, so activations and FLOPs are a tp rank's.
        tp_degree: Its degree.
        ep: The `ExpertParallel` pass (None: none): applied on a fake world of `ep_degree`
            ranks, so what its dispatch keeps is in the count.
        ep_degree: The degree to trace at (`ep_trace_degree`).

    Returns:
        A `BlockTrace`.
    """
    # The meter collects garbage before counting; freezing the objects that exist now (torch's
    # own, the caller's) makes each collection scan only what the trace made.
    gc.freeze()
    try:
        return _trace(model, micro_batch, seq, ac, cp, cp_degree, tp, tp_degree, ep, ep_degree)
    except UNTRACEABLE as e:  # e.g. `.item()` on meta
        raise PlanningError(
            f"`predict` cannot trace {type(model).__name__}'s forward on meta for its "
            f"activations ({type(e).__name__}: {str(e).splitlines()[0]}).\n"
            "  fix: `state_bytes(ModelShapes.of(model), degrees, pipeline)` gives its "
            "parameter, gradient and AdamW bytes; measure activations with "
            "`LiveActivationMeter`."
        ) from e
    finally:
        gc.unfreeze()


def _trace(
    model: nn.Module | MoEConfig,
    micro_batch: int,
    seq: int,
    ac: Pass | None,
    cp: Pass | None,
    cp_degree: int,
    tp: Pass | None,
    tp_degree: int,
    ep: Pass | None = None,
    ep_degree: int = 1,
) -> BlockTrace:
    meta = traced_model(model)
    passes, d = traced_pipeline(ac, cp, cp_degree, tp, tp_degree, ep, ep_degree)
    degree = d.cp
    local = seq // degree
    # The last cp rank (tp rank 0, ep rank 0): without load balancing its queries see every K/V
    # block, so it computes (and under "selective" checkpointing keeps) the most; with it, all
    # are alike.
    with meta_world(d.world_size, (degree - 1) * d.tp):
        mesh = ParallelMesh.build(
            dp_shard=d.dp_shard, cp=degree, ep=d.ep, tp=d.tp, device_type="cpu"
        )
        assert mesh["cp"].get_local_rank() == degree - 1, "the trace runs on the last cp rank"
        if passes:
            meta = Pipeline(passes).apply(meta, mesh)
        structure = discover(meta)
        ids = torch.zeros(micro_batch, local, dtype=torch.int64, device="meta")
        positions = torch.arange(local, device="meta").expand(micro_batch, local)
        labels = torch.zeros(micro_batch, local, dtype=torch.int64, device="meta")
        meter = TracingMeter(exclude=[meta, ids, positions, labels])
        # As training feeds them: a Hugging Face model makes its own positions unless CP shards
        # the sequence (`moetx.training.data`); moetx's models are given them.
        plain_hf = hf_model_type(meta) is not None and degree == 1
        extra = {} if plain_hf else {"position_ids": positions}
        if hf_model_type(meta) is not None and degree > 1:  # labels shifted over whole rows
            extra["shift_labels"] = labels
        handles, kinds = [], {}
        for i, block in enumerate(structure.blocks):
            kinds[i] = "mtp" if block.is_mtp else "moe" if block.moe is not None else "dense"
            pre, post = _hook(meter, i)
            handles += [block.module.register_forward_pre_hook(pre)]
            handles += [block.module.register_forward_hook(post)]
            if block.moe is not None:
                handles += _flag_hooks(meter, block.moe.experts, "in_experts")
                handles += _flag_hooks(meter, block.moe.router, "in_router")
        packs = torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t)
        try:
            with FlashOnMeta(meter.values), flash_blocks(), meter, packs:
                out = meta(ids, labels=labels, **extra)
            kept = meter.live_storages(exclude=[out.logits, out.loss])
        finally:
            for h in handles:
                h.remove()
    per_index: defaultdict[int, int] = defaultdict(int)
    for s in kept:
        per_index[meter.tags.get(id(s), OUTSIDE)] += s.nbytes()
    blocks: dict[str, int] = {}
    flops: dict[str, int] = {}
    rerun: dict[str, dict[str, int]] = {mode: {} for mode in MODES}
    rerun_experts: dict[str, dict[str, int]] = {mode: {} for mode in MODES}
    for i, kind in kinds.items():  # one block of each kind is representative
        blocks.setdefault(kind, per_index[i])
        flops.setdefault(kind, meter.flops[i])
        at_pack = meter.at_pack.get(i, Counter())
        for mode in MODES:
            rerun[mode].setdefault(kind, at_pack[mode, False])
            rerun_experts[mode].setdefault(kind, at_pack[mode, True])
    with_experts = sum(1 for b in structure.blocks if b.moe is not None)
    return BlockTrace(
        outside=per_index[OUTSIDE],
        blocks=blocks,
        flops_outside=meter.flops[OUTSIDE],
        flops=flops,
        expert_flops=meter.expert_flops // max(with_experts, 1),
        recompute_flops=rerun,
        recompute_expert_flops=rerun_experts,
    )


def _flag_hooks(meter: TracingMeter, module: nn.Module, flag: str) -> list[Any]:
    """Hooks that set `meter.<flag>` while `module`'s forward runs."""

    def pre(module: nn.Module, args: Any) -> None:
        setattr(meter, flag, True)

    def post(module: nn.Module, args: Any, out: Any) -> None:
        setattr(meter, flag, False)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
