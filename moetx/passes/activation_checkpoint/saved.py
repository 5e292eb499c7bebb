"""Saved outputs of one checkpointed call, replayed by (op, call index) during recomputation.

`Cache` records the outputs forward saves and hands them back in the same order when the block
is recomputed; `SavedStore` keeps those saved tensors copy-on-write, so an in-place op forward
runs later on a saved output never changes what the recomputation gets.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.checkpoint import SAC_IGNORED_OPS

from moetx.core.errors import ActivationCheckpointError

__all__ = ["Cache", "SavedStore"]


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


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `t`'s memory: `t`, or a wrapper subclass's inner tensors.

    A traceable wrapper subclass (a DTensor under `TensorParallel`/`FSDP`, whose outputs the
    caches see when a matmul runs on DTensor operands) has no memory of its own: its storage is
    invalid and `data_ptr()` raises. Its memory is that of its inner tensors (a DTensor's local
    shard), which plain ops on `to_local()` views of it also write to.
    """
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    inner = (getattr(t, name) for name in names)  # a DTensor also lists its device mesh
    return [leaf for x in inner if isinstance(x, torch.Tensor) for leaf in _plain(x)]


def _storage_keys(t: object) -> list[int]:
    """The addresses of the memory `t` lives in (none for non-tensors, sparse or empty ones)."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        return []
    return [key for leaf in _plain(t) if (key := _plain_key(leaf)) is not None]


def _plain_key(t: torch.Tensor) -> int | None:
    if t.layout != torch.strided:
        return None
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a subclass that does not flatten: unwatched
        return None
    if not storage.nbytes():
        return None
    # Meta storages all have address 0; the storage object's own identity tells them apart
    # (the planner traces checkpointed blocks on `meta`: moetx.planning.predict_activations).
    return storage._cdata if t.is_meta else storage.data_ptr()


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

    def take(self, cache: Cache) -> torch.Tensor:
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


class SavedStore:
    """The tensors the caches of one checkpointed forward saved, by storage: copy-on-write.

    Only used while that forward runs (its entries are dropped when it ends).
    """

    def __init__(self) -> None:
        self.by_storage: dict[int, list[_Saved]] = {}

    def add(self, saved: _Saved) -> _Saved:
        for key in _storage_keys(saved.tensor):
            self.by_storage.setdefault(key, []).append(saved)
        return saved

    def before(self, op: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Move the saved tensors `op` is about to write to onto copies."""
        if self.by_storage and getattr(op, "_schema", None) is not None and op._schema.is_mutable:
            self.copy_out(_written(op, args, kwargs))

    def copy_out(self, tensors: Any) -> None:
        """Move the saved tensors that share storage with any of `tensors` onto copies."""
        for t in pytree.tree_leaves(tensors):
            for key in _storage_keys(t):
                group = self.by_storage.pop(key, None)
                if group:
                    _copy(group)

    def clear(self) -> None:
        self.by_storage.clear()


def _copy(group: list[_Saved]) -> None:
    """Give `group` (saved tensors on one storage) fresh copies of their memory, keeping their
    views (one copy per storage) and wrapper subclasses (rebuilt around copied inner tensors)."""
    clones: dict[int, torch.UntypedStorage] = {}

    def copy_plain(t: torch.Tensor) -> torch.Tensor:
        key = _plain_key(t)
        if key is None:
            return t.clone()
        if key not in clones:
            clones[key] = t.untyped_storage().clone()
        copy = torch.empty(0, dtype=t.dtype, device=t.device)
        copy.set_(clones[key], t.storage_offset(), t.size(), t.stride())
        return copy

    with torch.no_grad():
        for saved in group:
            saved.tensor = _map_plain(saved.tensor, copy_plain)
            saved.version = saved.tensor._version


def _map_plain(t: torch.Tensor, fn: Any) -> torch.Tensor:
    """`t` with `fn` applied to each plain tensor holding its memory (see `_plain`)."""
    if not is_traceable_wrapper_subclass(t):
        return fn(t)  # type: ignore[no-any-return]
    names, ctx = t.__tensor_flatten__()
    inner = {name: getattr(t, name) for name in names}
    inner = {k: _map_plain(x, fn) if isinstance(x, torch.Tensor) else x for k, x in inner.items()}
    return type(t).__tensor_unflatten__(inner, ctx, t.size(), t.stride())  # type: ignore[attr-defined, no-any-return]


class Cache:
    """One selective-checkpoint cache: per op, what each forward call of it saved (or not)."""

    def __init__(self, saves: Any, store: SavedStore, owner: str, mode: str) -> None:
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
