"""Sum forward-accumulated routing-load counters over every data and context-parallel rank.

Aux-loss-free balancing (DeepSeek-V3) updates a routing bias from how many tokens each expert
received. Under data or context parallelism each rank only sees its tokens, so a per-rank
counter would update replicated biases differently on each rank: a silent divergence. moetx
all-reduces each forward's *increment* of every counter buffer the structure module reports,
so the counters always hold global counts. The increment is a few int64s per MoE layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetx.structure.discovery import discover

_INSTALLED = "_moetx_load_sync"


def _buffer(module: nn.Module, name: str) -> torch.Tensor:
    return module.get_buffer(name)


def install_load_sync(model: nn.Module, group: dist.ProcessGroup) -> int:
    """Hook every MoE layer with counter buffers so their increments are summed over `group`.

    The hooks sit on the layer's *block* (the increment of a block call is the layer's): under
    `Compile` a block's module hooks run outside its compiled forward, so the snapshot and the
    all-reduce (an in-place c10d collective) stay eager while the block compiles whole, and a
    recomputation under `ActivationCheckpoint` (which calls the block's inner forward) never
    triggers them. Idempotent (a second call on the same layer does nothing). Returns the
    number of layers hooked. Increments made while autograd runs backward are not reduced, so
    recomputation adds no collective.
    """
    hooked = 0
    for block in discover(model).blocks:
        layer = block.moe
        if layer is None:
            continue
        moe, names = layer.module, layer.counter_buffer_names
        if not names or getattr(moe, _INSTALLED, False):
            continue
        snapshots: dict[str, torch.Tensor] = {}
        block.module.register_forward_pre_hook(_snapshot(moe, names, snapshots))
        block.module.register_forward_hook(_reduce_increment(moe, names, snapshots, group))
        moe.__dict__[_INSTALLED] = True
        hooked += 1
    return hooked


def _snapshot(moe: nn.Module, names: tuple[str, ...], snapshots: dict[str, torch.Tensor]) -> Any:
    def hook(block: nn.Module, args: Any) -> None:
        for n in names:
            snapshots[n] = _buffer(moe, n).clone()

    return hook


def _reduce_increment(
    moe: nn.Module,
    names: tuple[str, ...],
    snapshots: dict[str, torch.Tensor],
    group: dist.ProcessGroup,
) -> Any:
    def hook(block: nn.Module, args: Any, output: Any) -> None:
        if torch._C._current_graph_task_id() != -1:  # recompute inside backward: not counted
            snapshots.clear()
            return
        for n in names:
            buf = _buffer(moe, n)
            before = snapshots.pop(n)
            increment = buf - before
            dist.all_reduce(increment, group=group)
            buf.copy_(before + increment)

    return hook
