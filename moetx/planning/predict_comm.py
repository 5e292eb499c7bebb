"""Communication bytes per step per rank, from the model's shapes and the collectives the passes issue.

Bytes are what leaves one rank (the ring/wire convention): an all-gather of a `b`-byte shard
over `w` ranks sends `(w-1)·b`, a reduce-scatter of a `w·b`-byte input `(w-1)·b`, a ring
all-reduce of `b` bytes `2(w-1)/w·b`, an all-to-all the rows addressed to other ranks. The
collectives are the ones the passes issue (see their docstrings), per step = one forward and
one backward of one micro-batch:

- `FSDP`: per unit (the root too, in torch 2.13), one all-gather in forward and one in backward
  (none in backward with `reshard_after_forward=False`, or for the units "auto" keeps gathered;
  `min_unit_bytes` joins small embedding / lm head units to the root and groups small blocks),
  one reduce-scatter of the gradients, and with HSDP an all-reduce over the replicas; FSDP2's
  padded shards (an aux loss or router logits among the outputs adds none: the root unit keeps
  FSDP2's once-per-backward prefetch, `moetx.passes.fsdp.prefetch`).
- `ExpertParallel` (the all-gather dispatcher: `_ep_all_gather`; all-to-all): per MoE layer in forward the int64 count exchange,
  the dispatch and the combine; in backward the two reversed; checkpointing in `full`/`router`
  mode reissues the forward three in backward (`selective` saves them).
- no `FSDP`: `moetx.sync_gradients`, one all-reduce of the dense gradients over the world and
  one per expert parameter over dp_replicate × ep_shard.
- `ContextParallel` (allgather): per attention layer one all-gather of the stacked K/V (HF
  latent attention: one K/V head per query head, padded to the wider of K and V), its
  reduce-scatter in backward, and a second all-gather under `full`/`router` checkpointing;
  (p2p, ring) per attention layer `cp - 1` sends of the K/V block in forward (again in a
  checkpointed block, in every mode), `cp - 1` of it and `cp` of its float32 gradient in
  backward (`send` ops).
- `TensorParallel` (no sequence parallelism; DTensor redistributions): in forward one
  all-reduce of the `[B, S, H]` activation per row-wise layer (attention `o_proj`, MLP
  `down_proj`) and for the vocabulary-parallel embedding, and one all-gather of the logits;
  in backward one all-reduce per column-wise layer's input gradient (q/k/v, gate/up, lm head;
  latent attention's are `q_lora_rank` / `kv_lora_rank` wide, and its shared rotary key's
  gradient is summed too); a recomputed block redoes its forward sums but an MLP's
  (checkpointing stops there; an aux loss after it makes it redo that one too). With
  sequence parallelism, all-gathers and reduce-scatters of the sequence-sharded residual
  stream at each region's edges, and one all-reduce per norm weight's gradient
  (`predict_sequence.sequence_parallel`).
- the small ones (`predict_aux`): with a routing bias under `FSDP` or `ContextParallel`, the
  load counters' all-reduce per MoE layer (`load_sync_all_reduce[world]`); with an aux loss
  under `ContextParallel`, its statistics' all-reduce, all-gather and reduce-scatter per MoE
  layer (`aux_*[cp]`; an HF model's router aux loss, `output_router_logits`, once per step);
  an HF model under `ContextParallel`, its batch check's all-reduce over every rank
  (`cp_guard_all_reduce[world]`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.planning.predict_aux import aux_collectives
from moetx.planning.predict_dedup import dedup_all_to_all
from moetx.planning.predict_flops import checkpoint_mode
from moetx.planning.predict_fsdp import fsdp_units
from moetx.planning.predict_sequence import ring_sends, sequence_parallel
from moetx.planning.predict_state import ModelShapes, find_pass, iter_blocks, uses_tp

__all__ = ["Traffic", "predict_comm", "recomputes_forward"]

#: `routing[layer][src][dst]`: token copies ep rank `src` sends to ep rank `dst` in MoE layer
#: `layer` (the MoE blocks in `discover` order); with `ExpertParallel(dedup=True)`, distinct
#: (token, dst) pairs.
Routing = Sequence[Sequence[Sequence[int]]]


@attrs.frozen
class Traffic:
    """One kind of collective on one mesh axis: calls and bytes sent per rank per step."""

    kind: str
    axis: str
    calls: int
    bytes: int
    worst_bytes: int = attrs.field(default=-1)

    def __attrs_post_init__(self) -> None:
        if self.worst_bytes < 0:
            object.__setattr__(self, "worst_bytes", self.bytes)


def recomputes_forward(pipeline: Pipeline, block: int) -> bool:
    """Whether block `block`'s forward reruns in backward (checkpointed in full/router mode)."""
    return checkpoint_mode(pipeline, block) in ("full", "router")


def _compute_itemsize(shapes: ModelShapes, pipeline: Pipeline) -> int:
    fsdp = find_pass(pipeline, "fsdp")
    dtype = getattr(fsdp, "param_dtype", None) if fsdp is not None else None
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype or "", shapes.compute_itemsize)


def _fsdp(shapes: ModelShapes, d: MeshDegrees, pipeline: Pipeline) -> list[Traffic]:
    fsdp = find_pass(pipeline, "fsdp")
    if fsdp is None:
        return []
    keep_all = getattr(fsdp, "reshard_after_forward", True) is False
    units = fsdp_units(shapes, d, pipeline)
    out: dict[tuple[str, str], list[int]] = {}
    for unit in units:
        axis = "ep_fsdp" if unit.name == "expert" else "dp_shard_cp"
        w, n = unit.mesh_size, unit.count
        if w > 1:
            gathers = 1 if keep_all or unit.kept else 2
            row = out.setdefault(("fsdp_all_gather", axis), [0, 0])
            row[0] += n * gathers
            row[1] += n * gathers * (w - 1) * unit.shard_bytes
            if unit.trained:
                row = out.setdefault(("fsdp_reduce_scatter", axis), [0, 0])
                row[0] += n
                row[1] += n * (w - 1) * unit.trained * unit.reduce_itemsize
        r = unit.replicate
        if r > 1 and unit.trained:
            row = out.setdefault(("hsdp_all_reduce", "dp_replicate"), [0, 0])
            row[0] += n
            row[1] += n * (2 * (r - 1) * unit.trained * unit.reduce_itemsize // r)
    return [Traffic(k, a, c, b) for (k, a), (c, b) in out.items()]


def _grad_sync(shapes: ModelShapes, d: MeshDegrees, pipeline: Pipeline) -> list[Traffic]:
    """`moetx.sync_gradients` (pipelines without FSDP): one flat all-reduce of the dense
    gradients over the world, and one per expert parameter over the ranks holding it."""
    if find_pass(pipeline, "fsdp") is not None:
        return []
    ep = find_pass(pipeline, "ep") is not None and d.ep > 1
    tp = uses_tp(pipeline, d)
    world, replicas = d.token_ranks, d.dp_replicate * d.ep_shard
    dense = experts = calls = 0
    for p, count in shapes.grouped:
        if not p.trainable:
            continue
        # DTensor's embedding backward returns the vocabulary-parallel table's gradient whole
        # (Replicate), and `sync_gradients` reduces what it gets.
        split = tp and p.tp_dim is not None and p.role != "embedding"
        numel = math.prod(p.shape) // (d.tp if split else 1)
        if p.role == "expert" and ep:
            if replicas > 1:
                calls += count
                experts += count * (2 * (replicas - 1) * (numel // d.ep * p.itemsize) // replicas)
        else:
            dense += count * numel * p.itemsize
    out = []
    if world > 1 and dense:
        out.append(Traffic("grad_all_reduce", "world", 1, 2 * (world - 1) * dense // world))
    if calls:
        out.append(Traffic("grad_all_reduce", "ep_fsdp", calls, experts))
    return out


def _ep(
    shapes: ModelShapes,
    d: MeshDegrees,
    pipeline: Pipeline,
    tokens: int,
    routing: Routing | None,
    ep_rank: int,
) -> list[Traffic]:
    ep = find_pass(pipeline, "ep")
    if ep is None or d.ep == 1:
        return []
    if getattr(ep, "dispatcher", "all_to_all") == "all_gather":
        return _ep_all_gather(shapes, d, pipeline, tokens)
    if getattr(ep, "dedup", False) and min(shapes.top_k, shapes.num_experts // d.ep) > 1:
        return _ep_dedup(shapes, d, pipeline, tokens, routing, ep_rank)
    e, k, row = (
        shapes.num_experts,
        shapes.top_k,
        shapes.hidden_size * _compute_itemsize(shapes, pipeline),
    )
    copies = tokens * k
    calls = total = worst = counts = 0
    moe = [i for i, _ in iter_blocks(shapes) if i in shapes.moe_blocks]
    for layer, block in enumerate(moe):
        if routing is not None:
            grid = routing[layer]
            sent = sum(c for j, c in enumerate(grid[ep_rank]) if j != ep_rank)
            received = sum(grid[j][ep_rank] for j in range(d.ep) if j != ep_rank)
        else:
            sent = received = copies * (d.ep - 1) // d.ep
        worst_sent = copies
        worst_received = (d.ep - 1) * tokens * min(k, e // d.ep)
        again = recomputes_forward(pipeline, block)
        fwd = 2 + again * 2  # forward (and recompute): dispatch + combine; backward: both reversed
        calls += 3 + 2 + 3 * again
        total += (fwd // 2) * (sent + received) * row + (sent + received) * row
        worst += (fwd // 2) * (worst_sent + worst_received) * row + (
            worst_sent + worst_received
        ) * row
        counts += (1 + again) * (d.ep - 1) * (e // d.ep) * 8
    return [
        Traffic("ep_all_to_all", "ep", calls, total + counts, worst + counts),
    ]


def _ep_dedup(
    shapes: ModelShapes,
    d: MeshDegrees,
    pipeline: Pipeline,
    tokens: int,
    routing: Routing | None,
    ep_rank: int,
) -> list[Traffic]:
    """`ExpertParallel(dedup=True)`: `moetx.planning.predict_dedup` with this module's dtype
    and recomputation rules."""
    itemsize = _compute_itemsize(shapes, pipeline)
    fsdp = find_pass(pipeline, "fsdp")
    name = getattr(fsdp, "param_dtype", None) if fsdp is not None else None
    default = {2: torch.bfloat16, 8: torch.float64}.get(itemsize, torch.float32)
    moe = [i for i, _ in iter_blocks(shapes) if i in shapes.moe_blocks]
    calls, expected, worst = dedup_all_to_all(
        shapes,
        d,
        tokens,
        routing,
        ep_rank,
        itemsize=itemsize,
        dtype=getattr(torch, name) if name else default,
        recompute=[recomputes_forward(pipeline, block) for block in moe],
    )
    return [Traffic("ep_all_to_all", "ep", calls, expected, worst)]


def _ep_all_gather(
    shapes: ModelShapes, d: MeshDegrees, pipeline: Pipeline, tokens: int
) -> list[Traffic]:
    """The all-gather dispatcher: per MoE layer in forward all-gathers of the token count, the
    expert ids, the hidden states and the routing weights, and a reduce-scatter of the partial
    outputs; in backward the reverse of the three autograd ones (reduce-scatters of the hidden and
    weight gradients, an all-gather of the output gradient); recomputation redoes the forward."""
    w, k, h = d.ep, shapes.top_k, shapes.hidden_size
    b = _compute_itemsize(shapes, pipeline)
    weights = b  # the routing weights arrive in the compute dtype (an fp32 router's too)
    rows = (w - 1) * tokens
    forward_ag = (w - 1) * 8 + rows * (k * 8 + h * b + k * weights)  # count, ids, hidden, weights
    gathers = scatters = ag_bytes = rs_bytes = 0
    for block in shapes.moe_blocks:
        again = recomputes_forward(pipeline, block)
        gathers += 4 * (1 + again) + 1
        scatters += 1 + again + 2
        ag_bytes += forward_ag * (1 + again) + rows * h * b
        rs_bytes += rows * h * b * (1 + again) + rows * (h * b + k * weights)
    return [
        Traffic("ep_all_gather", "ep", gathers, ag_bytes),
        Traffic("ep_reduce_scatter", "ep", scatters, rs_bytes),
    ]


def _cp(
    shapes: ModelShapes, d: MeshDegrees, pipeline: Pipeline, micro_batch: int, seq: int
) -> list[Traffic]:
    cp = find_pass(pipeline, "cp")
    if cp is None or d.cp == 1:
        return []
    # The input guard all-gathers each rank's [rows, tokens] (two int64) once per forward.
    guard = Traffic("cp_all_gather", "cp", 1, (d.cp - 1) * 2 * 8)
    kv_heads = shapes.kv_heads // (d.tp if uses_tp(pipeline, d) else 1)
    numel = 2 * micro_batch * kv_heads * (seq // d.cp) * shapes.head_dim  # K and V stacked
    kv = numel * _compute_itemsize(shapes, pipeline)
    if getattr(cp, "comm", "allgather") == "p2p":
        # Every checkpointing mode reruns the ring: "selective" saves functional collectives'
        # outputs, and the ring's sends are c10d point-to-point ops inside an autograd Function.
        ac = find_pass(pipeline, "ac")
        every = getattr(ac, "every", 1)
        reruns = sum(ac is not None and (i + 1) % every == 0 for i in range(shapes.num_blocks))
        calls, sent = ring_sends(d.cp, shapes.num_blocks, shapes.num_blocks + reruns, kv, numel * 4)
        return [guard, Traffic("cp_send", "cp", calls, sent)]
    forwards = sum(1 + recomputes_forward(pipeline, i) for i in range(shapes.num_blocks))
    return [
        Traffic("cp_all_gather", "cp", forwards + 1, forwards * (d.cp - 1) * kv + guard.bytes),
        Traffic("cp_reduce_scatter", "cp", shapes.num_blocks, shapes.num_blocks * (d.cp - 1) * kv),
    ]


def _tp(
    shapes: ModelShapes, d: MeshDegrees, pipeline: Pipeline, micro_batch: int, seq: int
) -> list[Traffic]:
    if not uses_tp(pipeline, d):
        return []
    t, itemsize, tokens = d.tp, _compute_itemsize(shapes, pipeline), micro_batch * (seq // d.cp)
    if getattr(find_pass(pipeline, "tp"), "sequence_parallel", False):
        recomputed = [recomputes_forward(pipeline, i) for i in range(shapes.num_blocks)]
        # norm gradients: summed by DTensor in the compute dtype before FSDP reduces them,
        # by `sync_gradients` in the parameter's dtype without FSDP
        norms = itemsize if find_pass(pipeline, "fsdp") is not None else None
        rows = sequence_parallel(shapes, t, tokens, itemsize, recomputed, norms)
        return [Traffic(kind, "tp", calls, sent) for kind, (calls, sent) in rows.items() if calls]

    def summed(width: int) -> int:  # an all-reduce of a [tokens, width] activation
        return 2 * (t - 1) * tokens * width * itemsize // t

    calls = sum(shapes.tp.outside_calls)
    sent = calls * summed(shapes.hidden_size)
    for i, (forward, backward) in enumerate(shapes.tp.block_calls):
        if recomputes_forward(pipeline, i):
            # the recomputation stops at the last saved tensor: the MLP's sum (a dense
            # `down_proj`, a shared expert's), which only feeds the residual, is not redone; a
            # MoE block without shared experts ends in routed experts, and redoes `o_proj`'s;
            # an aux loss, computed after the MLP from saved tensors, makes it redo them all
            last = i not in shapes.moe_blocks or forward > 1
            forward += forward - (last and i not in shapes.aux_blocks)
        calls += forward + backward
        sent += forward * summed(shapes.hidden_size) + summed(shapes.tp.grad_widths[i])
    out = [Traffic("tp_all_reduce", "tp", calls, sent)]
    if shapes.tp.logits:
        local = tokens * (shapes.tp.logits // t) * itemsize
        out.append(Traffic("tp_all_gather", "tp", 1, (t - 1) * local))
    return out


def predict_comm(
    shapes: ModelShapes,
    degrees: MeshDegrees,
    pipeline: Pipeline,
    *,
    micro_batch: int,
    seq: int,
    routing: Routing | None = None,
    ep_rank: int = 0,
) -> tuple[Traffic, ...]:
    """Collective bytes one rank sends in one training step (forward + backward), per kind and axis.

    Args:
        shapes: The model (`ModelShapes.of`).
        degrees: The mesh.
        pipeline: The passes.
        micro_batch: Rows per data rank.
        seq: Global sequence length (a cp rank holds `seq / cp`).
        routing: The token copies each ep rank sends to each other per MoE layer
            (`routing[layer][src][dst]`); None: a uniform router's expected load, with the
            worst case (every copy remote, one rank receiving all it can) in `worst_bytes`.
        ep_rank: The rank's position in its ep group (with `routing`).
    """
    tokens = micro_batch * (seq // degrees.cp)
    again = {i for i in range(shapes.num_blocks) if recomputes_forward(pipeline, i)}
    small = aux_collectives(shapes, degrees, pipeline, micro_batch=micro_batch, recomputed=again)
    return tuple(
        _fsdp(shapes, degrees, pipeline)
        + _grad_sync(shapes, degrees, pipeline)
        + _ep(shapes, degrees, pipeline, tokens, routing, ep_rank)
        + _cp(shapes, degrees, pipeline, micro_batch, seq)
        + _tp(shapes, degrees, pipeline, micro_batch, seq)
        + [Traffic(*row) for row in small]
    )
