"""`ActivationCheckpoint`: recompute transformer blocks in backward, never re-deciding the routing."""

from __future__ import annotations

import functools
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moetx.core.algebra import Pass, register_pass
from moetx.core.errors import ActivationCheckpointError, NoMoELayersError, PassPreconditionError
from moetx.core.options import at_least, one_of, option
from moetx.core.order import Placement
from moetx.core.record import Applied
from moetx.passes.activation_checkpoint import compiled
from moetx.passes.activation_checkpoint.contexts import (
    SAVED_OPS,
    BlockState,
    RouterScope,
    block_contexts,
)
from moetx.passes.activation_checkpoint.kv_cache import kv_cache
from moetx.passes.foreign import refuse_foreign_parallelism
from moetx.passes.load_sync import sync_routing_load
from moetx.structure.discovery import Block, discover
from moetx.structure.swap import swap_class

if typing.TYPE_CHECKING:
    from moetx.mesh.parallel_mesh import ParallelMesh

__all__ = [
    "MODES",
    "SAVED_OPS",
    "ActivationCheckpoint",
    "ActivationCheckpointError",
    "is_checkpointed",
    "side_effect_buffers",
]

MODES: tuple[str, ...] = ("full", "router", "selective")
"""Values `ActivationCheckpoint.mode` accepts."""

_STATE_ATTR = "_moetx_activation_checkpoint"


@register_pass("ac")
@typing.final
@attrs.frozen(kw_only=True, repr=False)
class ActivationCheckpoint(Pass):
    """Recompute transformer blocks in backward instead of keeping their activations.

    **What it does.** Every `every`-th transformer block (backbone, then MTP; the blocks
    `discover` reports, counted from 1, so `every=2` takes the 2nd, 4th, ...) runs under
    non-reentrant `torch.utils.checkpoint.checkpoint`: forward keeps the block's inputs (plus
    what `mode` saves) and backward re-runs the block to rebuild the rest. The block's class is
    swapped for a generated subclass whose `forward` wraps the original one (what FSDP2's
    `fully_shard` does), so module names, parameter FQNs and state-dict keys do not change, and
    a later `fully_shard` on the same block composes (its hooks stay outside the recomputed
    region, so its block all-gather is not recomputed).

    Modes:
        - `"full"`: recompute the whole block. Least memory (about the block input per block).
        - `"router"` (default): selective checkpointing that saves what each router computes
          (its projection, scores and top-k; dtype casts, views and in-place ops excepted) and
          recomputes the rest. A recomputation therefore reuses the forward's routing: it can
          never send a token elsewhere, and dispatch shapes are identical (Automodel#2635,
          #3140, torchtitan#3146). Costs O(tokens x experts) per MoE layer.
        - `"selective"`: also saves matmuls, attention kernels and functional-collective
          outputs (`SAVED_OPS`); recomputes cheap elementwise work (torchtitan's op-level SAC).

    **Side effects run once.** A block's side-effect buffers (`side_effect_buffers`: the load
    counters `discover` reports, such as the router's `expert_load`) are snapshotted when a
    recomputation starts and restored when it ends, so a counter accumulated in forward counts each token once per
    step in every mode (Automodel#3247). Each router call has its own selective-checkpoint
    cache, and in `"selective"` mode the block's cache only ever sees `SAVED_OPS`, so a router
    that skips its counter when recomputed, or FSDP2 units nested in the block (experts, an
    fp32 router) whose hooks run different ops in forward and recomputation, cannot derail the
    replay of the other ops.

    **Saved outputs changed in place.** Forward code may change an output these modes save in
    place afterwards (HF routers' `top_k_weights /= sum`, DeepSeek-V3's `group_mask.scatter_`,
    HF grouped_mm experts' `out.add_(bias)`). The cache then keeps a copy made just before the
    change (copy-on-write) and the recomputation reruns the in-place op on it, so gradients are
    bitwise those without checkpointing (torch's SAC raises here, or with
    `allow_cache_entry_mutation=True` replays the change twice). moetx sees every op of a
    router call and, in `"selective"` mode, of the block; in `"router"` mode the saved tensors
    a router returns are copied when it returns. A saved tensor changed elsewhere (after the
    block, or one a router keeps on itself) raises `ActivationCheckpointError` in the first
    backward, naming the module; use `mode="full"` there.

    **KV caches.** A block given a Hugging Face KV cache (`use_cache=True`) appends to it in
    forward only: its recomputation gets back what each `cache.update` returned in forward and
    leaves the cache alone (`kv_cache.UpdateReplay`), so the cache after a training step holds
    each layer's tokens once, as without checkpointing.

    **Collectives under `ExpertParallel`.** Per MoE layer and step, recomputation re-issues,
    in `"full"` and `"router"` mode, the layer's whole dispatch: the int64 count exchange and
    both token all-to-alls (all `_c10d_functional.all_to_all_single`), every rank in the same
    order, during backward. In `"selective"` mode it re-issues none: their outputs are saved.
    Backward's own two all-to-alls per layer run in every mode.

    Stage `ac`: after `cp` and `ep`, before `fsdp`. `apply` consumes its input: the model is
    changed in place and returned.

    Preconditions (typed `MoetxError`s, raised before anything changes): the model holds no
    parallelism from outside moetx (`PassPreconditionError`); its blocks are
    discoverable (`UnknownModelStructureError`); `every` is at most the number of blocks
    (`PassPreconditionError`); `mode="router"` needs an MoE layer with a router
    (`NoMoELayersError`).

    Upstream APIs: `torch.utils.checkpoint.checkpoint(use_reentrant=False, context_fn=...)`
    with moetx's own selective-checkpoint caches (the replay-by-call-index of torch's
    `create_selective_checkpoint_contexts`, plus copy-on-write; `SAC_IGNORED_OPS`),
    `TorchDispatchMode`, module forward hooks (`always_call=True`) on routers.

    Args:
        mode: `"full"`, `"router"` or `"selective"`.
        every: Checkpoint every `every`-th block (1: all).

    Example:
        >>> ActivationCheckpoint(mode="selective", every=2)
        ActivationCheckpoint(mode='selective', every=2)
    """

    placement: ClassVar[Placement] = Placement.builtin("ac")

    mode: str = option("router", one_of(*MODES))
    every: int = option(1, at_least(1))

    def check(self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]) -> None:
        """Raise if blocks are missing, `every` skips them all, or router mode has no router."""
        refuse_foreign_parallelism(model, record, by="ActivationCheckpoint")
        structure = discover(model)
        name = type(model).__name__
        if not structure.blocks:
            raise PassPreconditionError(
                f"`{name}` has no transformer blocks for `ActivationCheckpoint` to checkpoint."
            )
        if self.every > len(structure.blocks):
            raise PassPreconditionError(
                f"`ActivationCheckpoint.every` ({self.every}) exceeds the number of blocks of "
                f"`{name}` ({len(structure.blocks)}), so no block would be checkpointed.\n"
                f"  fix: use `every` <= {len(structure.blocks)}."
            )
        if self.mode == "router" and not structure.moe_layers():
            raise NoMoELayersError(
                f'`ActivationCheckpoint(mode="router")` needs an MoE layer with a router, and '
                f"`{name}` has none.\n"
                '  fix: use `ActivationCheckpoint(mode="full")` or `mode="selective"` for a '
                "dense model."
            )

    def _apply(
        self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]
    ) -> nn.Module:
        # Routing-load counters count every token rank's tokens, not this rank's (load_sync).
        sync_routing_load(model, mesh)
        scope = RouterScope()
        for block in self._blocks(model):
            if self.mode != "full" and block.moe is not None:
                router = block.moe.router
                compiled.register_router_class(type(router))
                scope.names[router] = block.moe.router_fqn
                router.register_forward_pre_hook(scope.enter)
                router.register_forward_hook(scope.exit, always_call=True)
            state = BlockState(self.mode, scope, side_effect_buffers(block), block.fqn)
            _install(block.module, state)
        return model

    def facts(self, model: nn.Module, mesh: ParallelMesh) -> Mapping[str, Any]:
        """`mode`, and `blocks`: FQNs of the checkpointed blocks (in `discover` order)."""
        return {"mode": self.mode, "blocks": tuple(b.fqn for b in self._blocks(model))}

    def _blocks(self, model: nn.Module) -> list[Block]:
        blocks = discover(model).blocks
        return [b for i, b in enumerate(blocks, 1) if i % self.every == 0]


def side_effect_buffers(block: Block) -> tuple[torch.Tensor, ...]:
    """The buffers `block`'s forward accumulates into (its MoE layer's `counter_buffer_names`)."""
    if block.moe is None:
        return ()
    return tuple(block.moe.module.get_buffer(name) for name in block.moe.counter_buffer_names)


# --------------------------------------------------------------------------- the class swap


class _CheckpointedBlock(nn.Module):
    """Mixin placed in front of a block's class: its forward runs under `checkpoint`."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state: BlockState = self.__dict__[_STATE_ATTR]
        if torch.compiler.is_compiling():  # traced: torch's contexts with moetx's policy
            context_fn = compiled.context_fn(state.mode)
        else:
            context_fn = functools.partial(block_contexts, state, kv_cache(kwargs))
        return checkpoint(
            super().forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs
        )


def _install(block: nn.Module, state: BlockState) -> None:
    swap_class(block, _CheckpointedBlock, "Checkpointed", _STATE_ATTR, state)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether `ActivationCheckpoint` installed checkpointing on `module` (a block)."""
    return _STATE_ATTR in module.__dict__
