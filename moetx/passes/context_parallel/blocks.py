"""One (query rows, K/V block) pair of blockwise attention: forward with log-sum-exp, backward.

The CPU flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu` and its backward)
on CPU, a float32 math kernel elsewhere; `attention` merges the blocks by log-sum-exp.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["_attend", "_attend_backward", "_attend_backward_math", "_attend_math"]


def _attend(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """`(softmax(q k^T * scale) v, log-sum-exp)` for one block (square when causal)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
            q, k, v, 0.0, causal, scale=scale
        )
        return out, lse
    return _attend_math(q, k, v, causal, scale)


def _attend_math(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    s = _scores(q, k, causal, scale)
    lse = s.logsumexp(-1)
    return (torch.exp(s - lse.unsqueeze(-1)) @ v.float()).to(v.dtype), lse


def _attend_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one block, given the *whole* row's output and log-sum-exp."""
    if q.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )
        return dq, dk, dv
    return _attend_backward_math(dout, q, k, v, out, lse, causal, scale)


def _attend_backward_math(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    p = torch.exp(_scores(q, k, causal, scale) - lse.unsqueeze(-1))
    delta = (dout.float() * out.float()).sum(-1, keepdim=True)
    ds = p * (dout.float() @ v.float().transpose(-1, -2) - delta)
    dq = (ds @ k.float()) * scale
    dk = (ds.transpose(-1, -2) @ q.float()) * scale
    return dq.to(q.dtype), dk.to(k.dtype), (p.transpose(-1, -2) @ dout.float()).to(v.dtype)


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -math.inf)
    return s
