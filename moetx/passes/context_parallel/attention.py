"""Causal attention over a sequence sharded across ranks: all-gather K/V, or a ring of K/V.

Both kernels take this rank's `q` `[B, H, S_l, D]` and `k`/`v` `[B, H_kv, S_l, D]` (GQA: `H_kv`
divides `H`) for the tokens `sequence_index(S_l, rank, degree, load_balance)` of every sequence,
and return this rank's rows of causal attention over the *whole* sequences. Which query rows
may see which rank's K/V block follows from those global token indices (`blocks._block_plan`),
never from local order; RoPE was already applied with global positions by the caller. Options:
the score `scale`, a sliding `window`, per-head attention `sinks` (Hugging Face models).

Both compute block by block (`moetx.passes.context_parallel.blocks`): each (query rows, K/V
block) pair that the causal mask (and window) allows runs through the CPU flash kernel
(`aten._scaled_dot_product_flash_attention_for_cpu`, which returns the log-sum-exp; a float32
math kernel elsewhere), and the partial outputs merge by log-sum-exp (online softmax) in float32. The backward runs the kernel's backward per block
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
from torch.distributed.distributed_c10d import GroupName, _resolve_process_group

from moetx.passes.context_parallel.blocks import (
    Layout,
    add_sinks,
    backward_block,
    forward_blocks,
    sequence_index,
    sink_grad,
)

__all__ = [
    "COMMS",
    "ContextParallelAttentionCore",
    "allgather_attention",
    "ring_attention",
    "sequence_index",
]

COMMS: tuple[str, ...] = ("allgather", "p2p")
"""Ways `ContextParallelAttentionCore` moves K/V between the ranks of the cp group."""


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


class _GatheredAttention(torch.autograd.Function):
    """Blockwise attention over K/V already gathered from every rank (`[D, 2, B, H_kv, S_l, D]`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, kv_all: Tensor, layout: Layout, scale: float, sinks: Tensor | None
    ) -> Tensor:
        if isinstance(kv_all, funcol.AsyncCollectiveTensor):
            kv_all = kv_all.wait()  # save the plain tensor, not the not-yet-waited wrapper
        out, lse = forward_blocks(q, enumerate(kv_all.unbind(0)), layout, scale)
        if sinks is not None:
            out, lse = add_sinks(out, lse, sinks)
        ctx.save_for_backward(q, kv_all, out, lse, sinks)
        ctx.layout, ctx.scale = layout, scale
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, kv_all, out, lse, sinks = ctx.saved_tensors
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv_all = torch.zeros(kv_all.shape, dtype=torch.float32, device=q.device)
        saved = (dout.contiguous(), q, out, lse)
        for src in range(kv_all.shape[0]):
            backward_block((dq, dkv_all[src]), saved, src, kv_all[src], ctx.layout, ctx.scale)
        dsinks = None if sinks is None else sink_grad(dout, out, lse, sinks)
        return dq.to(q.dtype), dkv_all.to(kv_all.dtype), None, None, dsinks


def _layout(
    group: dist.ProcessGroup, load_balance: bool, window: int | None, q: Tensor, scale: Any
) -> tuple[Layout, float]:
    rank, degree = dist.get_rank(group), dist.get_world_size(group)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return Layout(rank, degree, load_balance, window), scale


def allgather_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    *,
    load_balance: bool,
    scale: float | None = None,
    window: int | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Causal attention of this rank's queries over the all-gathered keys and values.

    `scale` multiplies the scores (default `1 / sqrt(head_dim)`, SDPA's); `window` limits each
    query to the `window` latest keys (itself included); `sinks [H]` adds one per-head logit to
    every softmax denominator (gpt-oss), and gets its gradient.

    Upstream APIs: `torch.distributed._functional_collectives.all_gather_single_autograd` (its
    backward reduce-scatters the K/V gradients back to their owners), the CPU flash kernel.
    """
    layout, scale = _layout(group, load_balance, window, q, scale)
    kv = torch.stack([k, v]).contiguous()  # [2, B, H_kv, S_l, D]: one collective for both
    gathered = funcol.all_gather_single_autograd(kv, 0, group)  # [degree * 2, ...], rank order
    kv_all = gathered.view(layout.degree, *kv.shape)
    return _GatheredAttention.apply(q, kv_all, layout, scale, sinks)


class _RingAttention(torch.autograd.Function):
    """Ring attention forward and backward on torch collectives (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        group: dist.ProcessGroup,
        layout: Layout,
        scale: float,
        sinks: Tensor | None,
    ) -> Tensor:
        kv = torch.stack([k, v]).contiguous()
        out, lse = _ring_forward(q, kv, group, layout, scale, sinks)
        ctx.save_for_backward(q, kv, out, lse, sinks)
        ctx.group, ctx.layout, ctx.scale = group, layout, scale
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, kv, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, kv, out, lse, ctx.group, ctx.layout, ctx.scale)
        dsinks = None if sinks is None else sink_grad(dout, out, lse, sinks)
        return dq, dk, dv, None, None, None, dsinks


def _ring_backward(
    dout: Tensor,
    q: Tensor,
    kv: Tensor,
    out: Tensor,
    lse: Tensor,
    group: dist.ProcessGroup,
    layout: Layout,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """`(dq, dk, dv)`: K/V go round the ring again, their gradient accumulators with them."""
    ring = _Ring(group)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # of the block held
    saved = (dout.contiguous(), q, out, lse)
    for src, held in ring.blocks(kv):
        backward_block((dq, dkv), saved, src, held, layout, scale)
        # The accumulator follows its block (a distinct tag: it travels beside the K/V
        # block of the same shape); after `degree` hops it is back with its owner.
        dkv, reqs = ring.shift(dkv, tag=1)
        _wait(reqs)
    return dq.to(q.dtype), dkv[0].to(kv.dtype), dkv[1].to(kv.dtype)


# Compiled: the ring as opaque custom ops (dynamo cannot trace `P2POp`; the shapes are static).


def _ring_forward(
    q: Tensor, kv: Tensor, group: dist.ProcessGroup, layout: Layout, scale: float, sinks: Any
) -> tuple[Tensor, Tensor]:
    out, lse = forward_blocks(q, _Ring(group).blocks(kv), layout, scale)
    return add_sinks(out, lse, sinks) if sinks is not None else (out, lse)


def _ring_layout(group_name: str, load_balance: bool, window: int | None) -> Any:
    group = _resolve_process_group(GroupName(group_name))
    layout = Layout(dist.get_rank(group), dist.get_world_size(group), load_balance, window)
    return group, layout


@torch.library.custom_op("moetx::cp_ring_attention", mutates_args=())
def _ring_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sinks: Tensor | None,
    group_name: str,
    load_balance: bool,
    window: int | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    group, layout = _ring_layout(group_name, load_balance, window)
    return _ring_forward(q, torch.stack([k, v]).contiguous(), group, layout, scale, sinks)


@_ring_op.register_fake
def _(q, k, v, sinks, group_name, load_balance, window, scale):  # type: ignore[no-untyped-def]
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)  # contiguous


@torch.library.custom_op("moetx::cp_ring_attention_backward", mutates_args=())
def _ring_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    group_name: str,
    load_balance: bool,
    window: int | None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    group, layout = _ring_layout(group_name, load_balance, window)
    dq, dk, dv = _ring_backward(
        dout, q, torch.stack([k, v]).contiguous(), out, lse, group, layout, scale
    )
    return dq, dk.clone(), dv.clone()  # dk, dv: views of one buffer; op outputs may not alias


@_ring_backward_op.register_fake
def _(dout, q, k, v, out, lse, group_name, load_balance, window, scale):  # type: ignore[no-untyped-def]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous


def _ring_op_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, sinks, *options = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], sinks)
    ctx.options = options


def _ring_op_grad(ctx, dout, dlse):  # type: ignore[no-untyped-def]
    q, k, v, out, lse, sinks = ctx.saved_tensors
    dq, dk, dv = _ring_backward_op(dout.contiguous(), q, k, v, out, lse, *ctx.options)
    dsinks = None if sinks is None else sink_grad(dout, out, lse, sinks)
    return dq, dk, dv, dsinks, None, None, None, None


_ring_op.register_autograd(_ring_op_grad, setup_context=_ring_op_setup)


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    *,
    load_balance: bool,
    scale: float | None = None,
    window: int | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Causal ring attention of this rank's queries over every rank's keys and values.

    `scale`, `window` and `sinks` as in `allgather_attention`.

    Upstream APIs: `dist.batch_isend_irecv` (`P2POp` with `group_peer`), the CPU flash kernel.
    """
    layout, scale = _layout(group, load_balance, window, q, scale)
    if torch.compiler.is_compiling():
        name = group.group_name
        return _ring_op(q, k, v, sinks, name, load_balance, window, scale)[0]  # type: ignore[no-any-return]
    return _RingAttention.apply(q, k, v, group, layout, scale, sinks)


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

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: float | None = None,
        window: int | None = None,
        sinks: Tensor | None = None,
    ) -> Tensor:
        """Attend causally over the whole sequences; shapes as `CausalAttentionCore.forward`.

        `k` and `v` share a shape; `scale`, `window`, `sinks` as in `allgather_attention`.
        """
        attend = allgather_attention if self.comm == "allgather" else ring_attention
        return attend(
            q,
            k,
            v,
            self.mesh.get_group(),
            load_balance=self.load_balance,
            scale=scale,
            window=window,
            sinks=sinks,
        )

    def extra_repr(self) -> str:
        return f"comm={self.comm!r}, degree={self.mesh.size()}, load_balance={self.load_balance}"
