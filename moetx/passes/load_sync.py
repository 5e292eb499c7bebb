"""Sum forward-accumulated routing-load counters over every token rank (data and context parallel).

Aux-loss-free balancing (DeepSeek-V3) updates a routing bias from how many tokens each expert
received. Under data or context parallelism each rank only sees its tokens, so a per-rank
counter would update replicated biases differently on each rank: a silent divergence. moetx
all-reduces each forward's *increment* of every counter buffer the structure module reports,
so the counters always hold global counts. The increment is a few int64s per MoE layer.

Every built-in pass installs the sum when its mesh has more than one token rank (whatever its
own degree), once per layer; `sync_routing_load` is the same call for a model no pass touched,
and `moetx.sync_gradients` refuses a model whose counters would stay local.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moetx.core.errors import UnknownModelStructureError
from moetx.mesh import ParallelMesh, as_parallel_mesh
from moetx.structure.discovery import discover

__all__ = ["install_load_sync", "local_load_layers", "sync_routing_load"]

_INSTALLED = "_moetx_load_sync"


def _buffer(module: nn.Module, name: str) -> torch.Tensor:
    return module.get_buffer(name)


def sync_routing_load(model: nn.Module, mesh: ParallelMesh | DeviceMesh) -> int:
    """From now on, sum every forward's routing-load counts over `mesh`'s token ranks.

    Each built-in pass does this when it is applied on a mesh with more than one token rank
    (dp_replicate x dp_shard x cp); call it yourself, once, before the first forward, for a
    model trained data-parallel without any moetx pass (`moetx.sync_gradients` refuses such a
    model otherwise). Idempotent; nothing to do on one token rank. Returns the number of MoE
    layers hooked by this call.
    """
    pmesh = as_parallel_mesh(mesh)
    if pmesh.degrees.token_ranks == 1:
        return 0
    return install_load_sync(model, pmesh.tokens.get_group())


def local_load_layers(model: nn.Module) -> tuple[str, ...]:
    """FQNs of the MoE layers whose routing-load counters count only this rank's tokens (no
    sum installed); `()` for a model without counters or one moetx does not recognise."""
    try:
        layers = discover(model).moe_layers()
    except UnknownModelStructureError:
        return ()
    return tuple(
        layer.fqn
        for layer in layers
        if layer.counter_buffer_names and not getattr(layer.module, _INSTALLED, False)
    )


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
        # eager even when a caller compiles the block module itself (`torch.compile(block)`
        # compiles its hooks as frames of their own): its forward stays one graph
        pre = torch.compiler.disable(_snapshot(moe, names, snapshots))
        post = torch.compiler.disable(_reduce_increment(moe, names, snapshots, group))
        block.module.register_forward_pre_hook(pre)
        block.module.register_forward_hook(post)
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
