"""The forward and recompute contexts `ActivationCheckpoint` hands to `torch.utils.checkpoint`.

What each mode saves (`SAVED_OPS`, everything a router computes), the scoping of caches (one
per router call; in "selective" mode one for the block's matmuls, attention and collectives),
and the snapshot/restore of side-effect buffers around recomputation. Scoping is explained at
the top of `moetx.passes.activation_checkpoint.saved`.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moetx.core.errors import ActivationCheckpointError
from moetx.passes.activation_checkpoint.kv_cache import UpdateReplay
from moetx.passes.activation_checkpoint.saved import Cache, SavedStore

__all__ = ["SAVED_OPS", "BlockState", "RouterScope", "block_contexts", "router_saves"]


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


# ------------------------------------------------------------------------- what is saved


def router_saves(op: Any) -> bool:
    """Whether a router call saves the output of `op` (all but casts, views, in-place ops)."""
    # Inside a router everything is saved except dtype casts and views (cheap, deterministic, and
    # saving them could keep the [T, H] input alive) and in-place ops (side effects: they rerun in
    # a recomputation, on the saved tensors' copies (`SavedStore`), and the buffer snapshot/restore
    # undoes what they do to the load counters).
    schema = getattr(op, "_schema", None)
    return not (schema is None or schema.is_mutable or op.is_view or op in _CAST_OPS)


def _block_saves(op: Any) -> bool:
    return True  # `_BlockSAC` hands the block's cache only `SAVED_OPS`


class _CacheMode(TorchDispatchMode):
    """A router call's cache as a dispatch mode: records (phase 0) or replays (phase 1)."""

    def __init__(self, cache: Cache, phase: int) -> None:
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


class RouterScope:
    """Router forward hooks: tell the active checkpoint context when a router call begins/ends.

    One per model; the hooks fire in forward and in recomputation alike. `names` maps each
    hooked router to its FQN (for error messages).
    """

    def __init__(self) -> None:
        self.depth = 0
        self.active: _Checkpointing | None = None
        self.names: dict[nn.Module, str] = {}

    def enter(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():  # traced: the compiled policy finds routers itself
            return
        self.depth += 1
        if self.depth == 1 and self.active is not None:
            self.active.enter_router(self.names.get(module, type(module).__name__))

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if self.depth == 1 and self.active is not None:
            self.active.exit_router(output)
        self.depth = max(0, self.depth - 1)


class _Caches:
    """The caches of one checkpointed call: the block's ("selective" only) and one per router
    call, and the store of everything they saved."""

    def __init__(self, fqn: str, mode: str) -> None:
        self.mode = mode
        self.store = SavedStore()
        self.block: Cache | None = None
        if mode == "selective":
            self.block = Cache(_block_saves, self.store, fqn, mode)
        self.routers: list[Cache] = []

    def rewind(self) -> None:
        """Before a recomputation: replay from each cache's first call again."""
        for cache in (self.block, *self.routers):
            if cache is not None:
                cache.replayed.clear()


class _BlockSAC(TorchDispatchMode):
    """Hands the block's cache the `SAVED_OPS` run outside routers; lets every other op run
    (in forward, after moving saved tensors it is about to write to onto copies)."""

    def __init__(self, scope: RouterScope, caches: _Caches, phase: int) -> None:
        super().__init__()
        self.scope, self.caches, self.phase = scope, caches, phase
        assert caches.block is not None
        self.cache: Cache = caches.block

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
        scope: RouterScope,
        caches: _Caches | None,
        phase: int,
        restore: tuple[torch.Tensor, ...] = (),
        kv: UpdateReplay | None = None,
    ) -> None:
        self.scope, self.caches, self.phase, self.restore = scope, caches, phase, restore
        self.kv = kv
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
            caches.routers.append(Cache(router_saves, caches.store, name, caches.mode))
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
        if self.kv is not None:
            self.kv.patch(self.phase)
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
            if self.kv is not None:
                self.kv.unpatch()
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
class BlockState:
    """What a checkpointed block needs at call time (stored in its `__dict__`, never changed)."""

    mode: str
    scope: RouterScope
    buffers: tuple[torch.Tensor, ...]
    fqn: str


def block_contexts(
    state: BlockState, kv_cache: Any = None
) -> tuple[_Checkpointing, _Checkpointing]:
    """The eager forward and recompute contexts of one call of the block `state` describes.

    `kv_cache`: the KV cache the call was given, if any: the recomputation replays the forward's
    updates of it instead of appending again (`kv_cache.UpdateReplay`).

    A module-level function (bound with `functools.partial`), not a method: `checkpoint` calls
    `context_fn()` with no arguments, and dynamo rejects bound methods there.
    """
    caches = None if state.mode == "full" else _Caches(state.fqn, state.mode)
    kv = None if kv_cache is None else UpdateReplay(kv_cache, state.fqn)
    return (
        _Checkpointing(state.scope, caches, 0, kv=kv),
        _Checkpointing(state.scope, caches, 1, restore=state.buffers, kv=kv),
    )
