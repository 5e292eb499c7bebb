"""`ActivationCheckpoint`: recompute transformer blocks in backward, never re-deciding the routing."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from moetx._errors import NoMoELayersError, PassPreconditionError
from moetx._order import Placement
from moetx._pass import Applied, Pass
from moetx._structure import Block, discover

if typing.TYPE_CHECKING:
    from moetx._mesh import ParallelMesh

__all__ = [
    "MODES",
    "SAVED_OPS",
    "ActivationCheckpoint",
    "is_checkpointed",
    "side_effect_buffers",
]

MODES: tuple[str, ...] = ("full", "router", "selective")
"""Values `ActivationCheckpoint.mode` accepts."""

_STATE_ATTR = "_moetx_activation_checkpoint"


def _ops(namespace: str, *names: str) -> frozenset[Any]:
    """Resolve `namespace.name.default` overloads, skipping any this torch build lacks."""
    ns = getattr(torch.ops, namespace)
    out = []
    for name in names:
        try:
            out.append(getattr(ns, name).default)
        except (AttributeError, RuntimeError):
            continue
    return frozenset(out)


SAVED_OPS: frozenset[Any] = _ops(
    "aten",
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_grouped_mm",
    "_scaled_mm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
) | _ops(
    "_c10d_functional",
    "all_to_all_single",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_reduce",
    "wait_tensor",
)
"""Ops whose outputs `mode="selective"` saves (besides everything the router computes): matmuls,
attention kernels, and functional collectives (so recomputation never re-issues a token
all-to-all). In-place c10d collectives and FSDP2's all-gather ops are deliberately absent."""

_CAST_OPS: frozenset[Any] = _ops("aten", "_to_copy")


def _valid_every(_: Any, attr: attrs.Attribute, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{attr.name}` ({value!r}) must be a positive integer.")


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
    counters `discover` reports, such as the router's `expert_load`) are snapshotted when a recomputation starts
    and restored when it ends, so a counter accumulated in forward counts each token once per
    step in every mode (Automodel#3247). Each router call has its own selective-checkpoint
    cache, and in `"selective"` mode the block's cache only ever sees `SAVED_OPS`, so a router
    that skips its counter when recomputed, or FSDP2 units nested in the block (experts, an
    fp32 router) whose hooks run different ops in forward and recomputation, cannot derail the
    replay of the other ops.

    **Collectives under `ExpertParallel`.** Per MoE layer and step, recomputation re-issues,
    in `"full"` and `"router"` mode, the layer's whole dispatch: the int64 count exchange and
    both token all-to-alls (all `_c10d_functional.all_to_all_single`), every rank in the same
    order, during backward. In `"selective"` mode it re-issues none: their outputs are saved.
    Backward's own two all-to-alls per layer run in every mode.

    Stage `ac`: after `cp` and `ep`, before `fsdp`. `apply` consumes its input: the model is
    changed in place and returned.

    Preconditions (typed `MoetxError`s, raised before anything changes): the model's blocks are
    discoverable (`UnknownModelStructureError`); `every` is at most the number of blocks
    (`PassPreconditionError`); `mode="router"` needs an MoE layer with a router
    (`NoMoELayersError`).

    Upstream APIs: `torch.utils.checkpoint.checkpoint(use_reentrant=False, context_fn=...)`,
    `create_selective_checkpoint_contexts`, `CheckpointPolicy`, `TorchDispatchMode`, module
    forward hooks (`always_call=True`) on routers.

    Args:
        mode: `"full"`, `"router"` or `"selective"`.
        every: Checkpoint every `every`-th block (1: all).

    Example:
        >>> ActivationCheckpoint(mode="selective", every=2)
        ActivationCheckpoint(mode='selective', every=2)
    """

    placement: ClassVar[Placement] = Placement.builtin("ac")

    mode: str = attrs.field(default="router", validator=attrs.validators.in_(MODES))
    every: int = attrs.field(default=1, validator=_valid_every)

    def check(self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]) -> None:
        """Raise if blocks are missing, `every` skips them all, or router mode has no router."""
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
        scope = _RouterScope()
        for block in self._blocks(model):
            routers = [block.moe.router] if block.moe is not None else []
            if self.mode != "full":
                for router in routers:
                    router.register_forward_pre_hook(scope.enter)
                    router.register_forward_hook(scope.exit, always_call=True)
            _install(block.module, _BlockState(self.mode, scope, side_effect_buffers(block)))
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


# ------------------------------------------------------------------------- what is saved


def _router_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    # Inside a router everything is saved except dtype casts and views (cheap, deterministic, and
    # saving them could keep the [T, H] input alive) and in-place ops (side effects: a cached
    # in-place op would be skipped on replay; the buffer snapshot/restore handles them instead).
    schema = getattr(op, "_schema", None)
    if schema is None or schema.is_mutable or op.is_view or op in _CAST_OPS:
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


def _must_save(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE


# ------------------------------------------------------------------ contexts per checkpoint
#
# torch's SAC replays its cache by (op, call index) and insists that recomputation runs exactly
# the ops forward ran, or it raises. Two things in an MoE block break that if one cache spans
# the block: a router that skips its load counter when recomputed (moetx's `_count_load`), and
# FSDP2 units nested in the block (experts, an fp32 router), whose hooks run different ops
# (`record_function`, all-gather copies) in forward and in recomputation. So caches are scoped:
#   - each router call gets its own SAC cache, pushed by the router's forward pre-hook and popped
#     by its forward hook (in forward and recomputation alike), holding only that call's ops;
#   - in "selective" mode, a dispatch mode over the whole block hands the block's cache only
#     `SAVED_OPS` run outside routers; every other op just runs.
# In "router" mode nothing intercepts the ops outside routers (no per-op Python overhead there).

_Pair = tuple[TorchDispatchMode, TorchDispatchMode]


def _cache(policy: Any) -> _Pair:
    """A (forward, recompute) pair of torch SAC modes sharing one cache."""
    forward, recompute = create_selective_checkpoint_contexts(policy)
    return forward, recompute


class _RouterScope:
    """Router forward hooks: tell the active checkpoint context when a router call begins/ends.

    One per model; the hooks fire in forward and in recomputation alike.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.active: _Checkpointing | None = None

    def enter(self, module: nn.Module, args: Any) -> None:
        self.depth += 1
        if self.depth == 1 and self.active is not None:
            self.active.enter_router()

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.depth == 1 and self.active is not None:
            self.active.exit_router()
        self.depth = max(0, self.depth - 1)


class _Caches:
    """The caches of one checkpointed call: the block's ("selective" only) and one per router call."""

    def __init__(self, *, selective: bool) -> None:
        self.block: _Pair | None = _cache(_must_save) if selective else None
        self.routers: list[_Pair] = []


class _BlockSAC(TorchDispatchMode):
    """Hands the block's cache the `SAVED_OPS` run outside routers; lets every other op run."""

    def __init__(self, scope: _RouterScope, cache: TorchDispatchMode) -> None:
        super().__init__()
        self.scope, self.cache = scope, cache

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if self.scope.depth > 0 or func not in SAVED_OPS:  # router ops: the router's cache
            return func(*args, **(kwargs or {}))
        return self.cache.__torch_dispatch__(func, types, args, kwargs)


class _Checkpointing:
    """Forward (phase 0) or recompute (phase 1) context of one checkpointed block call.

    The recompute context also snapshots the block's side-effect buffers on entry and restores
    them on exit, so a recomputation never leaves a second count behind.
    """

    def __init__(
        self,
        scope: _RouterScope,
        caches: _Caches | None,
        phase: int,
        restore: tuple[torch.Tensor, ...] = (),
    ) -> None:
        self.scope, self.caches, self.phase, self.restore = scope, caches, phase, restore
        self.router_call = -1
        self._router_mode: TorchDispatchMode | None = None
        self._block_mode: _BlockSAC | None = None
        self._outer: tuple[int, _Checkpointing | None] = (0, None)
        self._snapshot: list[torch.Tensor] = []

    def enter_router(self) -> None:
        if self.caches is None:
            return
        self.router_call += 1
        if self.phase == 0:
            self.caches.routers.append(_cache(_router_policy))
        elif self.router_call >= len(self.caches.routers):
            raise RuntimeError(
                "activation checkpointing: a recomputation called more routers than the forward "
                f"did ({len(self.caches.routers)}); the block's control flow changed in backward."
            )
        self._router_mode = self.caches.routers[self.router_call][self.phase]
        self._router_mode.__enter__()

    def exit_router(self) -> None:
        mode, self._router_mode = self._router_mode, None
        if mode is not None:
            mode.__exit__(None, None, None)

    def __enter__(self) -> _Checkpointing:
        self._snapshot = _snapshot(self.restore)
        self._outer = (self.scope.depth, self.scope.active)
        self.scope.depth, self.scope.active = 0, self
        self.router_call = -1
        if self.caches is not None and self.caches.block is not None:
            self._block_mode = _BlockSAC(self.scope, self.caches.block[self.phase])
            self._block_mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.exit_router()  # only if a recomputation stopped inside a router
            if self._block_mode is not None:
                self._block_mode.__exit__(*exc)
                self._block_mode = None
        finally:
            self.scope.depth, self.scope.active = self._outer
            _restore(self.restore, self._snapshot)


def _snapshot(buffers: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [b.clone() for b in buffers]


def _restore(buffers: tuple[torch.Tensor, ...], snapshot: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buf, saved in zip(buffers, snapshot, strict=True):
            buf.copy_(saved)


@attrs.frozen(eq=False)
class _BlockState:
    """What a checkpointed block needs at call time (stored in its `__dict__`, never changed)."""

    mode: str
    scope: _RouterScope
    buffers: tuple[torch.Tensor, ...]

    def context_fn(self) -> tuple[_Checkpointing, _Checkpointing]:
        caches = None if self.mode == "full" else _Caches(selective=self.mode == "selective")
        return (
            _Checkpointing(self.scope, caches, 0),
            _Checkpointing(self.scope, caches, 1, restore=self.buffers),
        )


# --------------------------------------------------------------------------- the class swap

_CLASSES: dict[type, type] = {}


class _CheckpointedBlock(nn.Module):
    """Mixin placed in front of a block's class: its forward runs under `checkpoint`."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state: _BlockState = self.__dict__[_STATE_ATTR]
        return checkpoint(
            super().forward, *args, use_reentrant=False, context_fn=state.context_fn, **kwargs
        )


def _install(block: nn.Module, state: _BlockState) -> None:
    cls = type(block)
    if not issubclass(cls, _CheckpointedBlock):
        new_cls = _CLASSES.get(cls)
        if new_cls is None:
            new_cls = type(f"Checkpointed{cls.__name__}", (_CheckpointedBlock, cls), {})
            _CLASSES[cls] = new_cls
        block.__class__ = new_cls
    block.__dict__[_STATE_ATTR] = state


def is_checkpointed(module: nn.Module) -> bool:
    """Whether `ActivationCheckpoint` installed checkpointing on `module` (a block)."""
    return _STATE_ATTR in module.__dict__
