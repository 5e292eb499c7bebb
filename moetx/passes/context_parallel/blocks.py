"""Blockwise causal attention over sequence-sharded tokens: the plan, the kernels, the merge.

A cp rank holds the tokens `sequence_index(...)` of every sequence. For each (its query rows,
a rank's K/V block) pair that the causal mask (and an optional sliding window) allows, one
kernel call computes `(out, log-sum-exp)`: the CPU flash kernel
(`aten._scaled_dot_product_flash_attention_for_cpu`, an additive mask where the window cuts a
block) on CPU, a float32 math kernel elsewhere. `forward_blocks` merges the blocks by
log-sum-exp (online softmax); `add_sinks` folds in per-head attention-sink logits (gpt-oss),
which act as one more key with value 0. `backward_block` runs the kernel's backward per block
with the *merged* output and log-sum-exp, which is each block's exact share of dq, dk, dv;
`sink_grad` is the sinks' gradient. `attention` moves the K/V blocks between ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Layout",
    "add_sinks",
    "backward_block",
    "forward_blocks",
    "sequence_index",
    "sink_grad",
]


def sequence_index(
    local_len: int,
    rank: int,
    degree: int,
    load_balance: bool,
    device: torch.device | str | None = None,
) -> Tensor:
    """Global token indices a cp rank holds, in its local order.

    With `load_balance`, a sequence of `2 * degree` equal chunks gives rank r chunks r and
    `2 * degree - 1 - r` (so every rank does the same causal work); otherwise rank r holds the
    r-th of `degree` contiguous chunks.

    Args:
        local_len: Tokens per sequence on one rank (even with `load_balance`).
        rank: The rank's index in the cp group.
        degree: The cp degree.
        load_balance: Head-tail chunk layout.
        device: Device of the returned int64 tensor.

    Example:
        >>> sequence_index(4, 0, 2, True).tolist()
        [0, 1, 6, 7]
    """
    if not load_balance:
        return torch.arange(rank * local_len, (rank + 1) * local_len, device=device)
    c = local_len // 2
    tail = 2 * degree - 1 - rank
    return torch.cat(
        [
            torch.arange(rank * c, (rank + 1) * c, device=device),
            torch.arange(tail * c, (tail + 1) * c, device=device),
        ]
    )


class Layout(NamedTuple):
    """Where a rank's tokens sit in the whole sequences, and which keys each query may see.

    A `NamedTuple`, not an attrs class: the attention forward builds one per call, and
    `torch.compile` cannot trace an attrs `__init__` (a graph break per attention call).

    Attributes:
        rank: The rank's index in the cp group.
        degree: The cp degree.
        load_balance: Head-tail chunk layout (see `sequence_index`).
        window: Sliding window: query i sees key j when `i - window < j <= i` (HF's
            `sliding_window`); None for plain causal attention.
    """

    rank: int
    degree: int
    load_balance: bool
    window: int | None = None


_ALL = slice(None)


def _block_plan(
    rank: int, src: int, local_len: int, load_balance: bool
) -> tuple[slice, slice, bool] | None:
    """Which local query rows attend which rows of rank `src`'s K/V block, and how.

    Returns `(query rows, key rows, causal)`, or None when no query may see the block. The
    causal case is always the rank's own block, whose local order is increasing global order,
    so a plain lower-triangular mask is right. With `load_balance` (chunks r, 2D-1-r):
    an earlier rank's block is seen only through its first chunk, by every query; a later
    rank's block only by the queries of the second chunk, in full.
    """
    if src == rank:
        return _ALL, _ALL, True
    if not load_balance:
        return (_ALL, _ALL, False) if src < rank else None
    half = local_len // 2
    if src < rank:
        return _ALL, slice(0, half), False
    return slice(half, None), _ALL, False


Plan = tuple[slice, slice, bool, Tensor | None]


def _plan(layout: Layout, src: int, local_len: int, device: torch.device) -> Plan | None:
    """`_block_plan` plus, under a sliding window, the block's additive mask (or None: skip)."""
    plan = _block_plan(layout.rank, src, local_len, layout.load_balance)
    if plan is None or layout.window is None:
        return None if plan is None else (*plan, None)
    rows, cols, causal = plan
    index = (
        sequence_index(local_len, r, layout.degree, layout.load_balance, device)
        for r in (layout.rank, src)
    )
    q_idx, k_idx = next(index)[rows, None], next(index)[None, cols]
    allowed = (k_idx <= q_idx) & (k_idx > q_idx - layout.window)
    if not allowed.any():
        return None
    if bool((allowed == (k_idx <= q_idx)).all()):  # the window cuts nothing here
        return rows, cols, causal, None
    mask = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, -math.inf)
    return rows, cols, False, mask


def _expand(x: Tensor, groups: int) -> Tensor:
    # GQA: query head h uses kv head h // groups (SDPA's `enable_gqa` convention).
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce(dx: Tensor, groups: int) -> Tensor:
    b, h, s, d = dx.shape
    return dx if groups == 1 else dx.view(b, h // groups, groups, s, d).sum(2)


def forward_blocks(
    q: Tensor, blocks: Iterator[tuple[int, Tensor]], layout: Layout, scale: float
) -> tuple[Tensor, Tensor]:
    """Attend `q` to each `(src rank, kv [2, B, H_kv, S_l, D])` block; return `(out, lse)`."""
    q = q.contiguous()
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], -math.inf, device=q.device)
    for src, kv in blocks:
        plan = _plan(layout, src, q.shape[2], q.device)
        if plan is None:
            continue
        rows, cols, causal, mask = plan
        groups = q.shape[1] // kv.shape[2]
        k_b, v_b = (_expand(t[:, :, cols], groups).contiguous() for t in kv)
        out_b, lse_b = _attend(q[:, :, rows].contiguous(), k_b, v_b, causal, scale, mask)
        if mask is not None:  # rows the window empties in this block: no weight, not lse 0
            lse_b = lse_b.masked_fill(torch.isinf(mask).all(-1), -math.inf)
        old = lse[:, :, rows]
        new = torch.logaddexp(old, lse_b)
        keep, add = torch.exp(old - new).nan_to_num(0.0), torch.exp(lse_b - new).nan_to_num(0.0)
        acc[:, :, rows] = acc[:, :, rows] * keep.unsqueeze(-1) + out_b.float() * add.unsqueeze(-1)
        lse[:, :, rows] = new
    return acc.to(q.dtype), lse


def backward_block(
    grads: tuple[Tensor, Tensor],
    saved: tuple[Tensor, Tensor, Tensor, Tensor],
    src: int,
    kv: Tensor,
    layout: Layout,
    scale: float,
) -> None:
    """Add one block's share to `grads = (dq, dkv)` (float32, in place)."""
    dq, dkv = grads
    dout, q, out, lse = saved
    plan = _plan(layout, src, q.shape[2], q.device)
    if plan is None:
        return
    rows, cols, causal, mask = plan
    groups = q.shape[1] // kv.shape[2]
    k_b, v_b = (_expand(t[:, :, cols], groups).contiguous() for t in kv)
    dq_b, dk_b, dv_b = _attend_backward(
        dout[:, :, rows].contiguous(),
        q[:, :, rows].contiguous(),
        k_b,
        v_b,
        out[:, :, rows].contiguous(),
        lse[:, :, rows].contiguous(),
        causal,
        scale,
        mask,
    )
    dq[:, :, rows] += dq_b.float()
    dkv[0][:, :, cols] += _reduce(dk_b.float(), groups)
    dkv[1][:, :, cols] += _reduce(dv_b.float(), groups)


def add_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Fold per-head sink logits `sinks [H]` into merged `(out, lse)`: one more key, value 0."""
    total = torch.logaddexp(lse, sinks.detach().float().view(1, -1, 1))
    return (out.float() * torch.exp(lse - total).unsqueeze(-1)).to(out.dtype), total


def sink_grad(dout: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """d loss / d sinks, from the final `out` and `lse` (sinks included): -sum p_sink * delta."""
    delta = (dout.float() * out.float()).sum(-1)
    p_sink = torch.exp(sinks.detach().float().view(1, -1, 1) - lse)
    return (-(p_sink * delta).sum((0, 2))).to(sinks.dtype)


def _attend(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """`(softmax(q k^T * scale + mask) v, log-sum-exp)` for one block (square when causal)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
            q, k, v, 0.0, causal, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale
        )
        return out, lse
    return _attend_math(q, k, v, causal, scale, mask)


def _attend_math(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    s = _scores(q, k, causal, scale, mask)
    lse = s.logsumexp(-1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    return (p @ v.float()).to(v.dtype), lse


def _attend_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one block, given the *whole* row's output and log-sum-exp."""
    if q.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            dout,
            q,
            k,
            v,
            out,
            lse,
            0.0,
            causal,
            attn_mask=None if mask is None else mask.to(q.dtype),
            scale=scale,
        )
        return dq, dk, dv
    return _attend_backward_math(dout, q, k, v, out, lse, causal, scale, mask)


def _attend_backward_math(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    p = torch.exp(_scores(q, k, causal, scale, mask) - lse.unsqueeze(-1))
    delta = (dout.float() * out.float()).sum(-1, keepdim=True)
    ds = p * (dout.float() @ v.float().transpose(-1, -2) - delta)
    dq = (ds @ k.float()) * scale
    dk = (ds.transpose(-1, -2) @ q.float()) * scale
    return dq.to(q.dtype), dk.to(k.dtype), (p.transpose(-1, -2) @ dout.float()).to(v.dtype)


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float, mask: Tensor | None) -> Tensor:
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -math.inf)
    return s
