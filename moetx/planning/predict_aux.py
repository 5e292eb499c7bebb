"""The small collectives beside the big ones: routing-load sums, aux-loss statistics, HF batch checks.

Each is a few bytes per MoE layer (or per forward), but a step issues them, so `predict_comm`
lists them (tests count every collective of a real step against the prediction):

- `load_sync_all_reduce` on `world` (the token ranks, dp_replicate × dp_shard × cp): with a
  routing bias (counter buffers, `ModelShapes.counters`) on more than one token rank, where
  every pass installs `moetx.passes.load_sync` (without a pass, `sync_gradients` requires
  `moetx.sync_routing_load`): per MoE layer and counter buffer, one all-reduce of the buffer's
  increment per forward; none in a recomputation.
- `aux_all_reduce` / `aux_all_gather` / `aux_reduce_scatter` on `cp`: with an aux loss under
  `ContextParallel` (cp > 1). moetx's `MoEBlock` (`StatsReducer`): per MoE layer in forward an
  all-reduce of the int64 `[B, E]` choice counts and an autograd all-gather of the float32
  `[B, E]` probability sums, both again in a block recomputed in `full`/`router` mode (in
  `selective` mode their outputs are saved), and the gather's reduce-scatter in backward.
  A Hugging Face model returning a router aux loss (`output_router_logits` and a
  `router_aux_loss_coef`: not DeepSeek-V3; `hf_aux`, one hook on the whole model, never
  recomputed): one all-reduce of `E + 2` float32 (counts, token count, formula check), one
  all-gather of the `E` float32 probability sums and its reduce-scatter in backward.
- `cp_guard_all_reduce` on `world` (every rank): a Hugging Face model under `ContextParallel`
  (cp > 1) checks each forward's batch with one all-reduce of 5 int64 flags (`_BatchGuard`).

Bytes follow `predict_comm`'s convention, per call (as the ranks send them): a ring all-reduce
of `b` bytes over `w` ranks `2(w-1)·b // w`, an all-gather `(w-1)·b`, a reduce-scatter of a
`w·b`-byte input `(w-1)·w·b // w`.
"""

from __future__ import annotations

from collections.abc import Collection

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.planning.predict_state import ModelShapes, find_pass

__all__ = ["Row", "aux_collectives"]

#: (kind, axis, calls, bytes): one row of `predict_comm.Traffic`.
Row = tuple[str, str, int, int]

_GUARD_FLAGS = 5  # `_BatchGuard._PROBLEMS`, one int64 each


def _all_reduce(nbytes: int, w: int) -> int:
    return 2 * (w - 1) * nbytes // w


def _load_sync(shapes: ModelShapes, d: MeshDegrees, pipeline: Pipeline) -> list[Row]:
    w = d.token_ranks
    if w == 1 or not shapes.counters:
        return []
    sent = sum(_all_reduce(b, w) for b in shapes.counters)
    return [("load_sync_all_reduce", "world", len(shapes.counters), sent)]


def _cp_stats(
    shapes: ModelShapes,
    d: MeshDegrees,
    pipeline: Pipeline,
    micro_batch: int,
    recomputed: Collection[int],
) -> list[Row]:
    c, e = d.cp, shapes.num_experts
    if find_pass(pipeline, "cp") is None or c == 1:
        return []
    out: list[Row] = []
    if shapes.hf:
        out.append(("cp_guard_all_reduce", "world", 1, _all_reduce(8 * _GUARD_FLAGS, d.world_size)))
    if shapes.router_aux:
        reduce, gather, scatter = _all_reduce(4 * (e + 2), c), (c - 1) * 4 * e, (c - 1) * 4 * e
        out += [("aux_all_reduce", "cp", 1, reduce), ("aux_all_gather", "cp", 1, gather)]
        out.append(("aux_reduce_scatter", "cp", 1, scatter))
    elif shapes.aux_blocks:
        layers = len(shapes.aux_blocks)
        forwards = layers + sum(b in recomputed for b in shapes.aux_blocks)
        cells = micro_batch * e  # [B, E]: int64 counts, float32 probability sums
        out.append(("aux_all_reduce", "cp", forwards, forwards * _all_reduce(8 * cells, c)))
        out.append(("aux_all_gather", "cp", forwards, forwards * (c - 1) * 4 * cells))
        out.append(("aux_reduce_scatter", "cp", layers, layers * ((c - 1) * c * 4 * cells // c)))
    return out


def aux_collectives(
    shapes: ModelShapes,
    d: MeshDegrees,
    pipeline: Pipeline,
    *,
    micro_batch: int,
    recomputed: Collection[int],
) -> list[Row]:
    """The rows above for one step; `recomputed`: the blocks whose forward reruns in backward
    (`predict_comm.recomputes_forward`)."""
    return _load_sync(shapes, d, pipeline) + _cp_stats(shapes, d, pipeline, micro_batch, recomputed)
