"""`ActivationCheckpoint`: recompute transformer blocks in backward, never re-deciding the routing."""

from __future__ import annotations

import typing
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import SAC_IGNORED_OPS, checkpoint

from moetx._errors import ActivationCheckpointError, NoMoELayersError, PassPreconditionError
from moetx._order import Placement
from moetx._pass import Applied, Pass
from moetx._structure import Block, discover
from moetx._swap import swap_class

if typing.TYPE_CHECKING:
    from moetx._mesh import ParallelMesh

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
            if self.mode != "full" and block.moe is not None:
                router = block.moe.router
                scope.names[router] = block.moe.router_fqn
                router.register_forward_pre_hook(scope.enter)
                router.register_forward_hook(scope.exit, always_call=True)
            state = _BlockState(self.mode, scope, side_effect_buffers(block), block.fqn)
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


# ------------------------------------------------------------------------- what is saved


def _router_saves(op: Any) -> bool:
    # Inside a router everything is saved except dtype casts and views (cheap, deterministic, and
    # saving them could keep the [T, H] input alive) and in-place ops (side effects: they rerun in
    # a recomputation, on the saved tensors' copies (`_Store`), and the buffer snapshot/restore
    # undoes what they do to the load counters).
    schema = getattr(op, "_schema", None)
    return not (schema is None or schema.is_mutable or op.is_view or op in _CAST_OPS)


def _block_saves(op: Any) -> bool:
    return True  # `_BlockSAC` hands the block's cache only `SAVED_OPS`


# ------------------------------------------------------------------ contexts per checkpoint
#
# A selective-checkpoint cache replays by (op, call index): recomputation must run exactly the
# ops forward ran, and each op whose output forward saved is answered with that output instead
# of running. Two things in an MoE block break that if one cache spans the block: a router that
# skips its load counter when recomputed (moetx's `_count_load`), and FSDP2 units nested in the
# block (experts, an fp32 router), whose hooks run different ops (`record_function`, all-gather
# copies) in forward and in recomputation. So caches are scoped:
#   - each router call gets its own cache, pushed by the router's forward pre-hook and popped by
#     its forward hook (in forward and recomputation alike), holding only that call's ops;
#   - in "selective" mode, a dispatch mode over the whole block hands the block's cache only
#     `SAVED_OPS` run outside routers; every other op just runs.
# In "router" mode nothing intercepts the ops outside routers (no per-op Python overhead there).
#
# In-place changes of saved tensors. A cache keeps a detached alias of each output it saves, so
# an in-place op that forward runs later on that output (HF routers' `top_k_weights /= sum`,
# DeepSeek-V3's `group_mask.scatter_`, HF grouped_mm experts' `out.add_(bias)`) would change the
# saved value too: the recomputation would get the changed value and then run the in-place op on
# it again (the bias added twice). torch's own SAC raises on that at backward, or, with
# `allow_cache_entry_mutation=True`, silently computes wrong gradients. moetx copies on write:
# in forward, before an op it sees writes to a saved tensor's storage, the saved tensors on that
# storage are moved to a copy (views and offsets kept), so the cache holds exactly the values
# the op produced and the recomputation, which reruns the in-place op, rebuilds every
# intermediate value of forward bit for bit. The ops it sees are every op of a router call and,
# in "selective" mode, every op of the block; and when a router returns, the saved tensors its
# outputs share storage with are copied right away, since the rest of a "router"-mode block runs
# unwatched. A saved tensor changed where none of that reaches (the block's callers, a tensor a
# router stashes on itself) is caught by its version counter when the recomputation asks for it:
# `ActivationCheckpointError`, naming the module and the fix.

_RECOMPUTE = object()
_CONSUMED = object()


def _detach(t: torch.Tensor) -> torch.Tensor:
    # Below autograd (inside `__torch_dispatch__`) ADInplaceOrView is excluded, and a `detach`
    # there would not share the version counter the mutation check reads (torch's SAC does this).
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False):
        return t.detach()


def _storage_key(t: object) -> int | None:
    """The address of `t`'s memory, or None for tensors without plain storage (or empty ones)."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        return None
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # wrapper subclasses (DTensor) have none
        return None
    return storage.data_ptr() if storage.nbytes() else None


def _written(op: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """The tensors `op` writes to (its `Tensor(a!)` arguments: `self` of `add_`, `out=`, ...)."""
    out = []
    for i, arg in enumerate(op._schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


class _Saved:
    """One tensor a cache holds: a detached alias of an op's output (or, once forward was about
    to change it in place, a copy), and its version counter when stored."""

    __slots__ = ("op", "tensor", "version")

    def __init__(self, op: Any, tensor: torch.Tensor) -> None:
        self.op, self.tensor, self.version = op, tensor, tensor._version

    def take(self, cache: _Cache) -> torch.Tensor:
        if self.tensor._version != self.version:
            where = (
                "inside the block's forward"
                if cache.mode == "selective"
                else "inside the router call, or when the router returns the tensor"
            )
            raise ActivationCheckpointError(
                f"`{cache.owner}`: the output of `{self.op}` that "
                f'`ActivationCheckpoint(mode="{cache.mode}")` saved was changed in place where '
                "the checkpoint does not watch, so recomputing from it would give wrong "
                "gradients.\n"
                f"  moetx copies a saved tensor before it changes only {where}.\n"
                '  fix: use `ActivationCheckpoint(mode="full")`, or make that change out of place.'
            )
        return self.tensor


class _Store:
    """The tensors the caches of one checkpointed forward saved, by storage: copy-on-write.

    Only used while that forward runs (its entries are dropped when it ends).
    """

    def __init__(self) -> None:
        self.by_storage: dict[int, list[_Saved]] = {}

    def add(self, saved: _Saved) -> _Saved:
        key = _storage_key(saved.tensor)
        if key is not None:
            self.by_storage.setdefault(key, []).append(saved)
        return saved

    def before(self, op: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Move the saved tensors `op` is about to write to onto copies."""
        if self.by_storage and getattr(op, "_schema", None) is not None and op._schema.is_mutable:
            self.copy_out(_written(op, args, kwargs))

    def copy_out(self, tensors: Any) -> None:
        """Move the saved tensors that share storage with any of `tensors` onto copies."""
        for t in pytree.tree_leaves(tensors):
            key = _storage_key(t)
            group = self.by_storage.pop(key, None) if key is not None else None
            if group:
                _copy(group)

    def clear(self) -> None:
        self.by_storage.clear()


def _copy(group: list[_Saved]) -> None:
    """Give `group` (saved tensors on one storage) one fresh copy of it, keeping their views."""
    with torch.no_grad():
        storage = group[0].tensor.untyped_storage().clone()
        for saved in group:
            t = saved.tensor
            copy = torch.empty(0, dtype=t.dtype, device=t.device)
            copy.set_(storage, t.storage_offset(), t.size(), t.stride())
            saved.tensor, saved.version = copy, copy._version


class _Cache:
    """One selective-checkpoint cache: per op, what each forward call of it saved (or not)."""

    def __init__(self, saves: Any, store: _Store, owner: str, mode: str) -> None:
        self.saves, self.store, self.owner, self.mode = saves, store, owner, mode
        self.slots: defaultdict[Any, list[Any]] = defaultdict(list)
        self.replayed: defaultdict[Any, int] = defaultdict(int)

    def record(self, op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Forward: run `op`, keeping its outputs if the policy saves it."""
        if op in SAC_IGNORED_OPS:
            return op(*args, **kwargs)
        self.store.before(op, args, kwargs)
        out = op(*args, **kwargs)
        slot: Any = _RECOMPUTE
        if self.saves(op):
            slot = pytree.tree_map_only(
                torch.Tensor, lambda t: self.store.add(_Saved(op, _detach(t))), out
            )
        self.slots[op].append(slot)
        return out

    def replay(self, op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Recomputation: answer `op` from the cache, or run it if forward did not save it."""
        if op in SAC_IGNORED_OPS:
            return op(*args, **kwargs)
        slots = self.slots.get(op, [])
        idx = self.replayed[op]
        self.replayed[op] = idx + 1
        if idx >= len(slots):
            raise ActivationCheckpointError(
                f"`{self.owner}`: the recomputation ran `{op}` more often than the forward did "
                f"({len(slots)} times); the block's control flow changed in backward."
            )
        slot = slots[idx]
        if slot is _RECOMPUTE:
            return op(*args, **kwargs)
        if slot is _CONSUMED:
            raise ActivationCheckpointError(
                f"`{self.owner}` was recomputed a second time: backward may run only once "
                "through a block checkpointed in router or selective mode."
            )
        slots[idx] = _CONSUMED
        return pytree.tree_map_only(_Saved, lambda s: s.take(self), slot)


class _CacheMode(TorchDispatchMode):
    """A router call's cache as a dispatch mode: records (phase 0) or replays (phase 1)."""

    def __init__(self, cache: _Cache, phase: int) -> None:
        super().__init__()
        self.cache, self.phase = cache, phase

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if self.phase == 0:
            return self.cache.record(func, args, kwargs or {})
        return self.cache.replay(func, args, kwargs or {})


class _RouterScope:
    """Router forward hooks: tell the active checkpoint context when a router call begins/ends.

    One per model; the hooks fire in forward and in recomputation alike. `names` maps each
    hooked router to its FQN (for error messages).
    """

    def __init__(self) -> None:
        self.depth = 0
        self.active: _Checkpointing | None = None
        self.names: dict[nn.Module, str] = {}

    def enter(self, module: nn.Module, args: Any) -> None:
        self.depth += 1
        if self.depth == 1 and self.active is not None:
            self.active.enter_router(self.names.get(module, type(module).__name__))

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.depth == 1 and self.active is not None:
            self.active.exit_router(output)
        self.depth = max(0, self.depth - 1)


class _Caches:
    """The caches of one checkpointed call: the block's ("selective" only) and one per router
    call, and the store of everything they saved."""

    def __init__(self, fqn: str, mode: str) -> None:
        self.mode = mode
        self.store = _Store()
        self.block: _Cache | None = None
        if mode == "selective":
            self.block = _Cache(_block_saves, self.store, fqn, mode)
        self.routers: list[_Cache] = []

    def rewind(self) -> None:
        """Before a recomputation: replay from each cache's first call again."""
        for cache in (self.block, *self.routers):
            if cache is not None:
                cache.replayed.clear()


class _BlockSAC(TorchDispatchMode):
    """Hands the block's cache the `SAVED_OPS` run outside routers; lets every other op run
    (in forward, after moving saved tensors it is about to write to onto copies)."""

    def __init__(self, scope: _RouterScope, caches: _Caches, phase: int) -> None:
        super().__init__()
        self.scope, self.caches, self.phase = scope, caches, phase
        assert caches.block is not None
        self.cache: _Cache = caches.block

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.scope.depth > 0:  # router ops: the router's cache (which also copies on write)
            return func(*args, **kwargs)
        if func not in SAVED_OPS:
            if self.phase == 0:
                self.caches.store.before(func, args, kwargs)
            return func(*args, **kwargs)
        if self.phase == 0:
            return self.cache.record(func, args, kwargs)
        return self.cache.replay(func, args, kwargs)


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

    def enter_router(self, name: str) -> None:
        caches = self.caches
        if caches is None:
            return
        self.router_call += 1
        if self.phase == 0:
            caches.routers.append(_Cache(_router_saves, caches.store, name, caches.mode))
        elif self.router_call >= len(caches.routers):
            raise ActivationCheckpointError(
                f"A recomputation called more routers than the forward did "
                f"({len(caches.routers)}); the block's control flow changed in backward."
            )
        self._router_mode = _CacheMode(caches.routers[self.router_call], self.phase)
        self._router_mode.__enter__()

    def exit_router(self, output: Any = None) -> None:
        mode, self._router_mode = self._router_mode, None
        if mode is not None:
            mode.__exit__(None, None, None)
            if self.phase == 0 and self.caches is not None and self.caches.block is None:
                # "router" mode watches nothing outside routers, where the outputs may be
                # changed in place: the saved tensors they share storage with are copied now.
                self.caches.store.copy_out(output)

    def __enter__(self) -> _Checkpointing:
        self._snapshot = _snapshot(self.restore)
        self._outer = (self.scope.depth, self.scope.active)
        self.scope.depth, self.scope.active = 0, self
        self.router_call = -1
        if self.caches is not None:
            if self.phase == 1:
                self.caches.rewind()
            if self.caches.block is not None:
                self._block_mode = _BlockSAC(self.scope, self.caches, self.phase)
                self._block_mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.exit_router()  # only if a call stopped inside a router
            if self._block_mode is not None:
                self._block_mode.__exit__(*exc)
                self._block_mode = None
        finally:
            self.scope.depth, self.scope.active = self._outer
            _restore(self.restore, self._snapshot)
            if self.phase == 0 and self.caches is not None:
                self.caches.store.clear()  # nothing is watched after forward


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
    fqn: str

    def context_fn(self) -> tuple[_Checkpointing, _Checkpointing]:
        caches = None if self.mode == "full" else _Caches(self.fqn, self.mode)
        return (
            _Checkpointing(self.scope, caches, 0),
            _Checkpointing(self.scope, caches, 1, restore=self.buffers),
        )


# --------------------------------------------------------------------------- the class swap


class _CheckpointedBlock(nn.Module):
    """Mixin placed in front of a block's class: its forward runs under `checkpoint`."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state: _BlockState = self.__dict__[_STATE_ATTR]
        return checkpoint(
            super().forward, *args, use_reentrant=False, context_fn=state.context_fn, **kwargs
        )


def _install(block: nn.Module, state: _BlockState) -> None:
    swap_class(block, _CheckpointedBlock, "Checkpointed", _STATE_ATTR, state)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether `ActivationCheckpoint` installed checkpointing on `module` (a block)."""
    return _STATE_ATTR in module.__dict__
