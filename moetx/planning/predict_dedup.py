"""Bytes of `ExpertParallel(dedup=True)`'s all-to-alls: distinct (token, rank) pairs, not copies.

Kept apart from `predict_comm` (which calls it with its dtype and recomputation rules) so each
module stays small. Per MoE layer: forward an int64 exchange of one count per rank, the dispatch
(hidden + E/ep weight columns + mask columns per pair, `moetx.passes.expert_parallel.dedup`)
and the combine (hidden per pair); backward both reversed; a recomputed forward redoes the three.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.passes.expert_parallel.dedup import mask_columns
from moetx.planning.predict_state import ModelShapes

__all__ = ["dedup_all_to_all", "ranks_per_token"]


def ranks_per_token(num_experts: int, top_k: int, ep: int) -> float:
    """Distinct ep ranks a token's k experts live on, expected under uniform top-k routing:
    `ep · (1 − C(E − E/ep, k) / C(E, k))` (one minus the chance that a rank holds none)."""
    none_here = math.comb(num_experts - num_experts // ep, top_k) / math.comb(num_experts, top_k)
    return ep * (1 - none_here)


def dedup_all_to_all(
    shapes: ModelShapes,
    d: MeshDegrees,
    tokens: int,
    routing: Sequence[Sequence[Sequence[int]]] | None,
    ep_rank: int,
    *,
    itemsize: int,
    dtype: torch.dtype,
    recompute: Sequence[bool],
) -> tuple[int, int, int]:
    """`(calls, bytes, worst-case bytes)` one ep rank sends in one step.

    Args:
        shapes: The model.
        d: The mesh.
        tokens: Tokens per rank.
        routing: `routing[layer][src][dst]`: distinct (token, dst) pairs ep rank `src` sends
            (None: uniform routing, `ranks_per_token` pairs per token, (ep − 1)/ep remote).
        ep_rank: The rank's position in its ep group (with `routing`).
        itemsize: Bytes of an element of the hidden states.
        dtype: Their dtype (how many local experts a mask column holds).
        recompute: Per MoE layer, whether its forward reruns in backward.

    The worst case: no two of a token's experts on one rank, so min(k, ep − 1) remote pairs
    per token sent, and every other rank's tokens received.
    """
    e, k = shapes.num_experts, shapes.top_k
    local = e // d.ep
    combine_row = shapes.hidden_size * itemsize
    dispatch_row = combine_row + (local + mask_columns(local, dtype)) * itemsize
    pairs = int(tokens * ranks_per_token(e, k, d.ep) * (d.ep - 1) / d.ep)
    worst_pairs = (tokens * min(k, d.ep - 1), (d.ep - 1) * tokens)
    calls = total = worst = 0
    for layer, again in enumerate(recompute):
        if routing is not None:
            grid = routing[layer]
            sent = sum(c for j, c in enumerate(grid[ep_rank]) if j != ep_rank)
            received = sum(grid[j][ep_rank] for j in range(d.ep) if j != ep_rank)
        else:
            sent = received = pairs

        def moved(sent: int, received: int, again: bool = again) -> int:
            forward = sent * dispatch_row + received * combine_row + (d.ep - 1) * 8  # + counts
            return (1 + again) * forward + sent * combine_row + received * dispatch_row

        calls += 3 + 2 + 3 * again
        total += moved(sent, received)
        worst += moved(*worst_pairs)
    return calls, total, worst
