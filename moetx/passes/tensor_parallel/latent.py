"""DeepSeek-V3 latent attention under TP: the shared rotary key's gradient is summed over tp.

`kv_a_proj_with_mqa` produces, per token, the compressed KV latent and one rotary key shared by
every head (multi-query). The latent reaches the heads through `kv_b_proj`, a column-wise layer
whose input gradient torch's TP all-reduces; the rotary key reaches them directly, so each tp
rank, holding only its heads, computes a partial gradient for it. Forward is the identity; in
backward this function sums the rotary slice over tp (Megatron's "copy to region" operator, on a
slice: torch has none for a slice, hence this hand-written Function).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

__all__ = ["install_shared_key_grad_sum"]


class _SumSliceGradOverTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, start: int, group: ProcessGroup) -> Tensor:
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.clone()
        part = grad[..., ctx.start :].contiguous()
        dist.all_reduce(part, group=ctx.group)
        grad[..., ctx.start :] = part
        return grad, None, None


class _Hook:
    def __init__(self, start: int, group: ProcessGroup) -> None:
        self.start, self.group = start, group

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return _SumSliceGradOverTP.apply(output, self.start, self.group)  # type: ignore[no-any-return]


def install_shared_key_grad_sum(attention: nn.Module, group: ProcessGroup) -> None:
    """Sum the gradient of `kv_a_proj_with_mqa`'s rotary-key columns over `group` (tp)."""
    start: int = attention.__dict__["kv_lora_rank"]  # a plain int (checked by the targets)
    attention.get_submodule("kv_a_proj_with_mqa").register_forward_hook(_Hook(start, group))
