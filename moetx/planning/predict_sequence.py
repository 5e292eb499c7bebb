"""Collectives of ring context parallelism and sequence parallelism per step: counts from shapes.

`predict_comm` wraps these into `Traffic` rows (same byte convention: what one rank sends).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from moetx.passes.tensor_parallel.sequence import NORM_NAMES
from moetx.planning.predict_state import ModelShapes

__all__ = ["norm_grads", "ring_sends", "sequence_parallel"]


def ring_sends(w: int, layers: int, forwards: int, kv: int, grad: int) -> tuple[int, int]:
    """(calls, bytes) of ring attention's sends (`attention._Ring`) over `layers` attention
    layers run `forwards` times in all (recomputations included): every forward passes the
    stacked K/V block (`kv` bytes) on `w - 1` times; backward passes it on `w - 1` times again
    and its float32 gradient accumulator (`grad` bytes) `w` times, home after a full turn.
    Every block travels whatever the causal mask (and `load_balance`) lets a rank skip."""
    calls = forwards * (w - 1) + layers * (2 * w - 1)
    return calls, (forwards + layers) * (w - 1) * kv + layers * w * grad


def sequence_parallel(
    shapes: ModelShapes,
    t: int,
    tokens: int,
    itemsize: int,
    recomputed: Sequence[bool],
    norm_itemsize: int | None,
) -> dict[str, tuple[int, int]]:
    """`{kind: (calls, bytes)}` of `TensorParallel(sequence_parallel=True)` at degree `t`
    (`tensor_parallel.sequence`), for `tokens` tokens of `itemsize`-byte activations.

    Per block in forward an all-gather of each region's input (attention, MLP or MoE) and a
    reduce-scatter of each row-wise region output (`o_proj`, a dense `down_proj`; a MoE block
    slices its output back, and its shared experts' `down_proj` all-reduces); backward
    all-gathers where forward reduce-scattered or sliced, and all-reduces each column-wise
    input's gradient. Outside: the embedding reduce-scatters its lookup (tied: slices it), the
    lm head all-gathers its input and its logits, and backward reverses the first two. A block
    with `recomputed[i]` redoes its forward collectives but a last one that only feeds the
    residual (a dense `down_proj`'s reduce-scatter, a shared expert's all-reduce, unless an aux
    loss follows it: `ModelShapes.aux_blocks`). Each norm
    weight's gradient is all-reduced once (`norm_grads`, `norm_itemsize`).
    """
    h = shapes.hidden_size
    shard = (t - 1) * (tokens // t) * h * itemsize  # an all-gather's or reduce-scatter's bytes
    whole = 2 * (t - 1) * tokens * h * itemsize // t  # a full activation's all-reduce
    vocab = bool(shapes.tp.outside_calls[0])  # a vocabulary-parallel embedding (not tied)
    gathers, scatters, sums = 2, 2 * vocab, 0  # outside blocks, as above
    for i, (rowwise, colwise) in enumerate(shapes.tp.block_calls):
        moe = i in shapes.moe_blocks
        scattered, summed = (1, rowwise - 1) if moe else (rowwise, 0)
        gathers += 4  # forward: both regions' inputs; backward: both regions' outputs
        scatters += scattered
        sums += summed + colwise
        if recomputed[i]:
            gathers += 2
            scatters += scattered - (not moe)
            # an aux loss (after the MLP, saving its inputs) keeps the recomputation going
            sums += summed if i in shapes.aux_blocks else max(summed - 1, 0)
    logits = (t - 1) * tokens * (shapes.tp.logits // t) * itemsize
    norms, norm_bytes = norm_grads(shapes, t, norm_itemsize)
    return {
        "tp_all_gather": (gathers + bool(shapes.tp.logits), gathers * shard + logits),
        "tp_reduce_scatter": (scatters, scatters * shard),
        "tp_all_reduce": (sums + norms, sums * whole + norm_bytes),
    }


def norm_grads(shapes: ModelShapes, t: int, itemsize: int | None) -> tuple[int, int]:
    """(calls, bytes): under sequence parallelism each trainable norm weight's gradient is
    partial over tp (each rank saw a part of the sequence) and settled by one all-reduce of
    `itemsize`-byte elements (None: the parameter's own dtype)."""
    calls = sent = 0
    for p in shapes.params:
        block_norm = any(f".{n}." in f".{p.fqn}" for n in NORM_NAMES)
        if p.trainable and (block_norm or (p.role == "root" and len(p.shape) == 1)):
            calls += 1
            sent += 2 * (t - 1) * math.prod(p.shape) * (itemsize or p.itemsize) // t
    return calls, sent
