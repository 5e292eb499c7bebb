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
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

__all__ = ["LiveActivationMeter"]


def _storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages behind `t`, looking through wrapper subclasses such as DTensor."""
    if is_traceable_wrapper_subclass(t):
        inner_names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
        for name in inner_names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):  # DTensor also lists its device mesh
                yield from _storages(inner)
        return
    try:
        yield t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested or storage-less tensors
        return


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


class LiveActivationMeter(TorchDispatchMode):
    """Track every op output made inside the context; report the bytes still alive.

    Use it around a forward pass; after the context exits, `live_bytes()` is what the forward
    left resident (for backward, or as outputs). Measure on a single process: under FSDP2 the
    meter also sees all-gathered parameters (TORCH-CPU-NOTES §3.5).

    Args:
        exclude: Tensors and modules (all their parameters and buffers) whose storages never
            count: the model and its inputs. Views of them are excluded too.

    Example:
        >>> import torch
        >>> x = torch.randn(16, 4, requires_grad=True)
        >>> with LiveActivationMeter(exclude=[x]) as live:
        ...     y = (x * 2).sin()  # sin saves its input x * 2 for backward
        >>> live.live_bytes(exclude=[y])
        256
    """

    def __init__(self, exclude: Iterable[torch.Tensor | nn.Module] = ()) -> None:
        super().__init__()
        self._excluded = _StorageSet()
        self.exclude(exclude)
        self._outputs = _StorageSet()

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
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                for s in _storages(t):
                    self._outputs.add(s)
        return out

    def live_storages(
        self, *, exclude: Iterable[torch.Tensor | nn.Module] = ()
    ) -> list[torch.UntypedStorage]:
        """Run the garbage collector; return the tracked storages still alive, minus exclusions."""
        gc.collect()
        extra = _StorageSet()
        for t in _expand(exclude):
            for s in _storages(t):
                extra.add(s)
        return [s for s in self._outputs.alive() if s not in self._excluded and s not in extra]

    def live_bytes(self, *, exclude: Iterable[torch.Tensor | nn.Module] = ()) -> int:
        """Bytes of tracked op-output storages still alive, each storage counted once.

        Args:
            exclude: More tensors or modules not to count this time, e.g. the forward's output.
        """
        return sum(s.nbytes() for s in self.live_storages(exclude=exclude))
