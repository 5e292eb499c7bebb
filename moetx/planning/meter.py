"""`LiveActivationMeter`: a deterministic count of the activation bytes a forward leaves alive.

Peak-RSS and allocator counters are noisy on CPU and see every temporary. What activation
checkpointing changes is narrower: how many bytes of op outputs the forward leaves resident for
backward. The meter is a `TorchDispatchMode` that holds a weak reference to the storage of every
op output made inside its context; `live_bytes()` runs the garbage collector and sums the
storages still alive. Storages of excluded tensors (parameters, buffers, inputs) never count, and
a storage shared by several views counts once.

Unlike a `saved_tensors_hooks` meter it also sees what non-reentrant checkpointing keeps (the
block inputs) and what selective checkpointing caches in its own dispatch mode, so it ranks
checkpointing variants the way the real peak memory does (TORCH-CPU-NOTES §3.5).

Collectives: a c10d `Work` holds its input and output tensors until it is destroyed, and gloo's
worker thread destroys a finished one only after it has woken the waiter, so for a moment after
`wait()` the buffers of the last collective (tensor parallelism's logits all-gather) are alive
though the program dropped them; read then, they counted as activations, intermittently. So the
meter hands every collective private twins of its tensors and the program aliases of the
collective's fresh outputs, holds what c10d got weakly, and reads only once it is all gone.

c10d also makes views of what it is given that the meter never sees (gloo's per-rank chunks of
an all-gather's output, or of a reduce-scatter's input) and may destroy them after everything
else, with the GIL released. A view made below autograd holds only the storage, so a twin that
shares the program's storage would die first. The twin of a buffer therefore sits on a storage
of its own over the same memory (a DLPack re-import, which keeps the program's storage alive
until the twin's storage dies), and the meter watches that storage: it dies with c10d's last
view of it, and the program's storage is released in the same GIL-held destructor chain, so a
reading woken by it cannot come in between. The exception is the in-place functional
collectives: c10d finds their Work by the output's storage, so their buffers keep plain aliases.
A collective's fresh output counts only while a tensor the program got on it is alive.
"""

from __future__ import annotations

import gc
import queue
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves, tree_map

from moetx.core.errors import MoetxError

__all__ = ["CollectiveHeldError", "LiveActivationMeter"]

#: How long a reading waits for c10d to release the collectives issued inside the meter.
RELEASE_TIMEOUT_S = 30.0
_COLLECTIVE_NAMESPACES = frozenset({"c10d", "_c10d_functional", "_c10d_functional_autograd"})
_NOT_COLLECTIVES = frozenset({"wait_tensor", "_wrap_tensor_autograd", "check_for_nan"})


class CollectiveHeldError(MoetxError, RuntimeError):
    """A collective issued inside the meter was not released in time to read the meter."""


def _leaves(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors behind `t`, looking through wrapper subclasses such as DTensor."""
    if is_traceable_wrapper_subclass(t):
        inner_names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
        for name in inner_names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):  # DTensor also lists its device mesh
                yield from _leaves(inner)
        return
    yield t


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested or storage-less tensors
        return None


def _storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages behind `t`, looking through wrapper subclasses such as DTensor."""
    for leaf in _leaves(t):
        s = _storage(leaf)
        if s is not None:
            yield s


def _expand(items: Iterable[torch.Tensor | nn.Module]) -> Iterator[torch.Tensor]:
    for item in items:
        if isinstance(item, nn.Module):
            yield from item.parameters()
            yield from item.buffers()
        elif isinstance(item, torch.Tensor):
            yield item
        else:
            raise TypeError(
                f"`exclude` holds tensors and modules only (got `{type(item).__name__}`)."
            )


class _StorageSet:
    """Storages by identity, held weakly (a storage's Python object lives as long as it does)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}

    def add(self, storage: torch.UntypedStorage) -> None:
        ref = self._refs.get(id(storage))
        if ref is None or ref() is not storage:  # new, or an id reused after the old one died
            self._refs[id(storage)] = weakref.ref(storage)

    def __contains__(self, storage: torch.UntypedStorage) -> bool:
        ref = self._refs.get(id(storage))
        return ref is not None and ref() is storage

    def alive(self) -> list[torch.UntypedStorage]:
        out = []
        for ref in self._refs.values():
            s = ref()
            if s is not None:
                out.append(s)
        return out


class _Releases:
    """Tensors and storages only c10d holds, held weakly; `wait` returns once every one is gone.

    The weak references' callback is a C function (`SimpleQueue.put`): it runs no Python code
    where c10d destroys the object, so the waiter cannot take the GIL before the destructor
    chain that released the object has finished.
    """

    def __init__(self) -> None:
        self._gone: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._refs: list[weakref.ref[Any]] = []

    def watch(self, obj: torch.Tensor | torch.UntypedStorage) -> None:
        self._refs.append(weakref.ref(obj, self._gone.put))

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._refs = [r for r in self._refs if r() is not None]
            if not self._refs:
                return
            try:
                self._gone.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                if any(r() is not None for r in self._refs):
                    raise CollectiveHeldError(
                        "`LiveActivationMeter` cannot read: a collective issued inside it is "
                        f"still held by c10d (after {timeout:g} s).\n"
                        "  a c10d Work keeps its input and output tensors alive until it is "
                        "destroyed; read now, they would count as activations\n"
                        "  fix: wait on and drop every Work (e.g. from `async_op=True`) "
                        "before reading"
                    ) from None


class _Reached:
    """Storages collectives allocated, each with (weakly) every tensor the program got on it."""

    def __init__(self) -> None:
        self._map: dict[int, tuple[weakref.ref[torch.UntypedStorage], list[weakref.ref[Any]]]] = {}

    def allocated(self, storage: torch.UntypedStorage) -> None:
        self._map[id(storage)] = (weakref.ref(storage), [])

    def seen(self, t: torch.Tensor, storage: torch.UntypedStorage) -> None:
        entry = self._map.get(id(storage))
        if entry is not None and entry[0]() is storage:
            entry[1].append(weakref.ref(t))

    def unreached(self, storage: torch.UntypedStorage) -> bool:
        """A collective's storage that no tensor the program was given references any more."""
        entry = self._map.get(id(storage))
        return entry is not None and entry[0]() is storage and all(r() is None for r in entry[1])


def _is_collective(func: Any) -> bool:
    return (
        getattr(func, "namespace", None) in _COLLECTIVE_NAMESPACES
        and func._overloadpacket.__name__ not in _NOT_COLLECTIVES
    )


def _plain(t: Any) -> bool:
    return type(t) is torch.Tensor


def _written_in_place(func: Any) -> set[str]:
    """Names of the arguments a functional collective writes (c10d keys its Work by them)."""
    if getattr(func, "namespace", None) == "c10d":
        return set()
    return {
        a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write
    }


def _alias(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | torch.UntypedStorage]:
    """An alias of `t` for c10d, and what to watch: the alias itself."""
    a = torch.ops.aten.alias.default(t)
    return a, a


def _twin(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | torch.UntypedStorage]:
    """A tensor over `t`'s memory on a storage of its own, which keeps `t`'s storage alive until
    it dies, and what to watch: that storage (views of the twin hold it). Where DLPack cannot
    carry the tensor, an alias (`_alias`)."""
    try:
        twin = torch.from_dlpack(t.detach())
    except Exception:  # a dtype or layout DLPack lacks
        return _alias(t)
    return twin, twin.untyped_storage()


class LiveActivationMeter(TorchDispatchMode):
    """Track every op output made inside the context; report the bytes still alive.

    Use it around a forward pass; after the context exits, `live_bytes()` is what the forward
    left resident (for backward, or as outputs). Measure on a single process: under FSDP2 the
    meter also sees all-gathered parameters (TORCH-CPU-NOTES §3.5).

    A reading first waits until c10d has released every collective issued inside the context
    (see the module docstring), at most `release_timeout` seconds.

    Args:
        exclude: Tensors and modules (all their parameters and buffers) whose storages never
            count: the model and its inputs. Views of them are excluded too.
        release_timeout: Seconds a reading waits for collectives to be released.

    Example:
        >>> import torch
        >>> x = torch.randn(16, 4, requires_grad=True)
        >>> with LiveActivationMeter(exclude=[x]) as live:
        ...     y = (x * 2).sin()  # sin saves its input x * 2 for backward
        >>> live.live_bytes(exclude=[y])
        256
    """

    def __init__(
        self,
        exclude: Iterable[torch.Tensor | nn.Module] = (),
        *,
        release_timeout: float = RELEASE_TIMEOUT_S,
    ) -> None:
        super().__init__()
        self._excluded = _StorageSet()
        self.exclude(exclude)
        self._outputs = _StorageSet()
        self._releases = _Releases()
        self._release_timeout = release_timeout
        self._reached = _Reached()

    def exclude(self, items: Iterable[torch.Tensor | nn.Module]) -> None:
        """Never count the storages of `items` (tensors, or modules' parameters and buffers)."""
        for t in _expand(items):
            for s in _storages(t):
                self._excluded.add(s)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if _is_collective(func):
            out = self._collective(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                for leaf in _leaves(t):
                    s = _storage(leaf)
                    if s is not None:
                        self._outputs.add(s)
                        self._reached.seen(leaf, s)
        return out

    def _collective(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run a collective on private twins of its tensors and watch what its Work holds.

        The Work keeps the tensors it was given (the twins, and views of them: the twins'
        storages are watched) and, for ops that allocate their result and run in place on it
        (functional all-reduce), that result: the program gets an alias of every fresh output,
        so the original too is held by c10d alone. The Work also
        holds views of a fresh output that the meter never sees (gloo's per-rank chunks), which
        it may drop after everything else: a fresh output's storage counts only while a tensor
        the program was given on it is alive (`_Reached`).
        """
        given: list[torch.Tensor] = []
        watched: list[torch.Tensor | torch.UntypedStorage] = []

        in_place = _written_in_place(func)

        def hand(name: str, value: Any) -> Any:
            def one(t: Any) -> Any:
                if not _plain(t):
                    return t
                a, watch = _alias(t) if name in in_place else _twin(t)
                given.append(a)
                watched.append(watch)
                return a

            return tree_map(one, value)

        names = [a.name for a in func._schema.arguments]
        args = tuple(hand(name, a) for name, a in zip(names, args, strict=False))
        kwargs = {k: hand(k, v) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        ids = {id(a) for a in given}

        def alias_fresh(t: Any) -> Any:
            if not _plain(t) or id(t) in ids:
                return t
            watched.append(t)
            storage = _storage(t)
            if storage is not None:
                self._reached.allocated(storage)
            return torch.ops.aten.alias.default(t)

        out = tree_map(alias_fresh, out)
        for w in watched:
            self._releases.watch(w)
        return out

    def live_storages(
        self, *, exclude: Iterable[torch.Tensor | nn.Module] = ()
    ) -> list[torch.UntypedStorage]:
        """Wait for collectives to be released, run the garbage collector; return the tracked
        storages still alive, minus exclusions.

        Raises:
            CollectiveHeldError: A collective issued inside the meter was still held by c10d
                after `release_timeout` seconds.
        """
        gc.collect()  # a Work held only by garbage goes with it
        self._releases.wait(self._release_timeout)
        gc.collect()
        extra = _StorageSet()
        for t in _expand(exclude):
            for s in _storages(t):
                extra.add(s)
        return [
            s
            for s in self._outputs.alive()
            if s not in self._excluded and s not in extra and not self._reached.unreached(s)
        ]

    def live_bytes(self, *, exclude: Iterable[torch.Tensor | nn.Module] = ()) -> int:
        """Bytes of tracked op-output storages still alive, each storage counted once.

        Args:
            exclude: More tensors or modules not to count this time, e.g. the forward's output.
        """
        return sum(s.nbytes() for s in self.live_storages(exclude=exclude))
