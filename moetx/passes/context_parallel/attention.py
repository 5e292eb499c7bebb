"""Causal attention over a sequence sharded across ranks: all-gather K/V, or a ring of K/V.

Both kernels take this rank's `q` `[B, H, S_l, D]` and `k`/`v` `[B, H_kv, S_l, D]` (GQA: `H_kv`
divides `H`) for the tokens `sequence_index(S_l, rank, degree, load_balance)` of every sequence,
and return this rank's rows of causal attention over the *whole* sequences. Which query rows
may see which rank's K/V block follows from those global token indices (`_block_plan`), never
from local order; RoPE was already applied with global positions by the caller.

Both compute block by block: each (query rows, K/V block) pair that the causal mask allows
runs through the CPU flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`, which
returns the log-sum-exp; a float32 math kernel elsewhere), and the partial outputs merge by
log-sum-exp (online softmax) in float32. The backward runs the kernel's backward per block
with the *merged* output and log-sum-exp, which is each block's exact share of dq, dk, dv.
No mask and no GQA-expanded K/V is kept for backward: only q, the K/V, out and the lse. Both
are hand-written `torch.autograd.Function`s: plain autograd through torch's private ring
templates gets dq wrong on CPU, because the flash backward ignores the lse's gradient
(TORCH-CPU-NOTES §3.6).

- `allgather_attention`: all-gather K and V over the group in one autograd-aware collective
  (its backward reduce-scatters the K/V gradients to their owners), then attend. Simple and
  fast; every rank keeps the whole sequences' K/V until backward.
- `ring_attention`: K/V blocks travel round a ring (`dist.batch_isend_irecv`, the next block
  in flight while the current one is computed). In backward, K/V go round again and their
  gradient accumulators travel with them, arriving home after a full turn. Each rank keeps
  only its own K/V.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from moetx.passes.context_parallel.blocks import _attend, _attend_backward

__all__ = [
    "COMMS",
    "ContextParallelAttentionCore",
    "allgather_attention",
    "ring_attention",
    "sequence_index",
]

COMMS: tuple[str, ...] = ("allgather", "p2p")
"""Ways `ContextParallelAttentionCore` moves K/V between the ranks of the cp group."""


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


class _Ring:
    """Send to the next rank and receive from the previous one, asynchronously."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank, self.degree = dist.get_rank(group), dist.get_world_size(group)

    def shift(self, t: Tensor, tag: int = 0) -> tuple[Tensor, list[Any]]:
        """Start sending `t` on and receiving its like; `wait` the requests before reading."""
        recv = torch.empty_like(t)
        send_to, recv_from = (self.rank + 1) % self.degree, (self.rank - 1) % self.degree
        ops = [
            dist.P2POp(dist.isend, t, group=self.group, tag=tag, group_peer=send_to),
            dist.P2POp(dist.irecv, recv, group=self.group, tag=tag, group_peer=recv_from),
        ]
        return recv, dist.batch_isend_irecv(ops)

    def blocks(self, kv: Tensor) -> Iterator[tuple[int, Tensor]]:
        """Yield `(src, block)` for every rank's block in ring order, the next one in flight."""
        for step in range(self.degree):
            if step + 1 < self.degree:
                nxt, reqs = self.shift(kv)
            yield (self.rank - step) % self.degree, kv
            if step + 1 < self.degree:
                _wait(reqs)
                kv = nxt


def _wait(reqs: list[Any]) -> None:
    for req in reqs:
        req.wait()


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


def _expand(x: Tensor, groups: int) -> Tensor:
    # GQA: query head h uses kv head h // groups (SDPA's `enable_gqa` convention).
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce(dx: Tensor, groups: int) -> Tensor:
    b, h, s, d = dx.shape
    return dx if groups == 1 else dx.view(b, h // groups, groups, s, d).sum(2)


def _forward_blocks(
    q: Tensor,
    blocks: Iterator[tuple[int, Tensor]],
    rank: int,
    load_balance: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Attend `q` to each `(src rank, kv [2, B, H_kv, S_l, D])` block; return `(out, lse)`."""
    q = q.contiguous()
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], -math.inf, device=q.device)
    for src, kv in blocks:
        plan = _block_plan(rank, src, q.shape[2], load_balance)
        if plan is None:
            continue
        rows, cols, causal = plan
        groups = q.shape[1] // kv.shape[2]
        k_b, v_b = (_expand(t[:, :, cols], groups).contiguous() for t in kv)
        out_b, lse_b = _attend(q[:, :, rows].contiguous(), k_b, v_b, causal, scale)
        old = lse[:, :, rows]
        new = torch.logaddexp(old, lse_b)
        acc[:, :, rows] = acc[:, :, rows] * torch.exp(old - new).unsqueeze(-1) + out_b.float() * (
            torch.exp(lse_b - new).unsqueeze(-1)
        )
        lse[:, :, rows] = new
    return acc.to(q.dtype), lse


def _backward_block(
    grads: tuple[Tensor, Tensor],
    saved: tuple[Tensor, Tensor, Tensor, Tensor],
    src: int,
    kv: Tensor,
    rank: int,
    load_balance: bool,
    scale: float,
) -> None:
    """Add one block's share to `grads = (dq, dkv)` (float32, in place)."""
    dq, dkv = grads
    dout, q, out, lse = saved
    plan = _block_plan(rank, src, q.shape[2], load_balance)
    if plan is None:
        return
    rows, cols, causal = plan
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
    )
    dq[:, :, rows] += dq_b.float()
    dkv[0][:, :, cols] += _reduce(dk_b.float(), groups)
    dkv[1][:, :, cols] += _reduce(dv_b.float(), groups)


class _GatheredAttention(torch.autograd.Function):
    """Blockwise attention over K/V already gathered from every rank (`[D, 2, B, H_kv, S_l, D]`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, kv_all: Tensor, rank: int, load_balance: bool, scale: float
    ) -> Tensor:
        if isinstance(kv_all, funcol.AsyncCollectiveTensor):
            kv_all = kv_all.wait()  # save the plain tensor, not the not-yet-waited wrapper
        out, lse = _forward_blocks(q, enumerate(kv_all.unbind(0)), rank, load_balance, scale)
        ctx.save_for_backward(q, kv_all, out, lse)
        ctx.rank, ctx.load_balance, ctx.scale = rank, load_balance, scale
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, kv_all, out, lse = ctx.saved_tensors
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv_all = torch.zeros(kv_all.shape, dtype=torch.float32, device=q.device)
        saved = (dout.contiguous(), q, out, lse)
        for src in range(kv_all.shape[0]):
            grads = (dq, dkv_all[src])
            _backward_block(grads, saved, src, kv_all[src], ctx.rank, ctx.load_balance, ctx.scale)
        return dq.to(q.dtype), dkv_all.to(kv_all.dtype), None, None, None


def allgather_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    *,
    load_balance: bool,
    scale: float | None = None,
) -> Tensor:
    """Causal attention of this rank's queries over the all-gathered keys and values.

    `scale` multiplies the scores (default `1 / sqrt(head_dim)`, SDPA's).

    Upstream APIs: `torch.distributed._functional_collectives.all_gather_single_autograd` (its
    backward reduce-scatters the K/V gradients back to their owners), the CPU flash kernel.
    """
    rank, degree = dist.get_rank(group), dist.get_world_size(group)
    kv = torch.stack([k, v]).contiguous()  # [2, B, H_kv, S_l, D]: one collective for both
    gathered = funcol.all_gather_single_autograd(kv, 0, group)  # [degree * 2, ...], rank order
    kv_all = gathered.view(degree, *kv.shape)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _GatheredAttention.apply(q, kv_all, rank, load_balance, scale)


class _RingAttention(torch.autograd.Function):
    """Ring attention forward and backward on torch collectives (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        group: dist.ProcessGroup,
        load_balance: bool,
        scale: float,
    ) -> Tensor:
        ring = _Ring(group)
        kv = torch.stack([k, v]).contiguous()
        out, lse = _forward_blocks(q, ring.blocks(kv), ring.rank, load_balance, scale)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.group, ctx.load_balance, ctx.scale = group, load_balance, scale
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, kv, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # of the block held
        saved = (dout.contiguous(), q, out, lse)
        for src, held in ring.blocks(kv):
            _backward_block((dq, dkv), saved, src, held, ring.rank, ctx.load_balance, ctx.scale)
            # The accumulator follows its block (a distinct tag: it travels beside the K/V
            # block of the same shape); after `degree` hops it is back with its owner.
            dkv, reqs = ring.shift(dkv, tag=1)
            _wait(reqs)
        return dq.to(q.dtype), dkv[0].to(kv.dtype), dkv[1].to(kv.dtype), None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    *,
    load_balance: bool,
    scale: float | None = None,
) -> Tensor:
    """Causal ring attention of this rank's queries over every rank's keys and values.

    Upstream APIs: `dist.batch_isend_irecv` (`P2POp` with `group_peer`), the CPU flash kernel.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _RingAttention.apply(q, k, v, group, load_balance, scale)


# ------------------------------------------------------------------------------ the module


class ContextParallelAttentionCore(nn.Module):
    """Drop-in for `CausalAttentionCore` on sequence-sharded inputs (installed by CP).

    Args:
        mesh: The 1-D cp mesh.
        comm: `"allgather"` or `"p2p"` (ring).
        load_balance: The head-tail layout `ContextParallel.shard_sequence` produced.
    """

    is_causal: bool = True

    def __init__(self, mesh: DeviceMesh, comm: str, load_balance: bool) -> None:
        super().__init__()
        if comm not in COMMS:
            raise ValueError(f"`comm` ({comm!r}) must be one of {COMMS}.")
        self.mesh = mesh
        self.comm = comm
        self.load_balance = load_balance

    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
        """Attend causally over the whole sequences; shapes as `CausalAttentionCore.forward`.

        `scale` multiplies the scores (default `1 / sqrt(head_dim)`); `k` and `v` share a shape.
        """
        group, lb = self.mesh.get_group(), self.load_balance
        if self.comm == "allgather":
            return allgather_attention(q, k, v, group, load_balance=lb, scale=scale)
        return ring_attention(q, k, v, group, load_balance=lb, scale=scale)

    def extra_repr(self) -> str:
        return f"comm={self.comm!r}, degree={self.mesh.size()}, load_balance={self.load_balance}"
