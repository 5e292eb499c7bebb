"""CPU twins of the small tensors a `meta` forward computes, so routing bookkeeping runs on meta.

A forward on `meta` has shapes but no values, yet expert dispatch reads a few small tensors on
the host: tokens per expert become all-to-all split sizes (`.tolist()`), received counts become
`repeat_interleave` lengths, and Hugging Face experts' offsets come from a `histc` of the local
expert ids. `MetaValues` keeps a CPU twin of every meta tensor whose value is knowable:

- small factories (`zeros`, `ones`, `arange`, `full`, `ones_like`, ...: at most `SMALL`
  elements);
- routed ids: a `topk` over values the trace does not have answers a round robin, copy `(t, j)`
  to expert `(t·k + j) mod E`: a perfectly balanced router, `T·k / E` copies per expert; a
  full `sort` over experts (moetx's router) the rotation `(t + j) mod E`, as balanced when T is
  a multiple of E (too many ids for a twin: `bincount(ids)` and `zeros(E).index_add(0, ids,
  ones)` answer the uniform counts);
- an op whose tensor inputs all have twins runs on the twins too; if its output size depends on
  values (`repeat_interleave`), the meta output takes the twin's size;
- collectives on a tensor with a twin behave as if every rank held the same values (under
  uniform routing the fake world's ranks are symmetric): an all-to-all returns this rank's block
  from each rank, an all-gather repeats, a sum all-reduce multiplies by the group size.

Host reads (`.tolist()`, `.item()`) of a tensor with a twin return the twin's values; of one
without, they fail as on any meta tensor (`predict` then says it cannot trace the model).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["SMALL", "MetaValues", "uniform_counts"]

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
#: The most elements a twin may have (an int64 twin of this size is 8 MiB).
SMALL = 1 << 20
_LIKE = (aten.ones_like.default, aten.zeros_like.default, aten.full_like.default)
_SORTS = (aten.sort.default, aten.sort.stable)
_SPECIAL = (aten.bincount.default, aten.topk.default, aten.index_add.default, *_SORTS, *_LIKE)

Dispatch = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]


def uniform_counts(items: int, bins: int) -> torch.Tensor:
    """`items` spread over `bins` as evenly as integers allow (the first bins get the rest)."""
    base, extra = divmod(items, max(bins, 1))
    return torch.tensor([base + (i < extra) for i in range(bins)], dtype=torch.int64)


class MetaValues:
    """The twins (see the module docstring), keyed by the meta tensor, held weakly."""

    def __init__(self) -> None:
        self._twins: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}

    def twin(self, t: Any) -> torch.Tensor | None:
        """The CPU twin of meta tensor `t`, or None."""
        if not isinstance(t, torch.Tensor):
            return None
        if not t.is_meta:
            return t if t.numel() <= SMALL else None
        entry = self._twins.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def know(self, meta: Any, value: Any) -> None:
        """Record `value` (CPU tensors) as the twin of `meta` (meta tensors, same structure)."""
        for m, v in zip(tree_leaves(meta), tree_leaves(value), strict=False):
            tensors = isinstance(m, torch.Tensor) and isinstance(v, torch.Tensor)
            if tensors and m.is_meta and v.numel() <= SMALL:
                self._twins[id(m)] = (weakref.ref(m, self._forget(id(m))), v)

    def _forget(self, key: int) -> Callable[[weakref.ref[torch.Tensor]], None]:
        """Drop the twin when its meta tensor dies (before its id can be reused): a twin made
        inside a meter (`torch.tensor(data, device="meta")`) would otherwise stay alive, and
        count as kept, until a later tensor happened to reuse the id."""

        def forget(ref: weakref.ref[torch.Tensor]) -> None:
            entry = self._twins.get(key)
            if entry is not None and entry[0] is ref:
                del self._twins[key]

        return forget

    def host_read(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What a host read of a twinned meta tensor returns; None when it is not one."""
        value = self.twin(args[0]) if args else None
        if value is None:
            return None
        if func is aten._local_scalar_dense.default:
            return value.item()
        if func is aten._to_copy.default and str(kwargs.get("device", "meta")) == "cpu":
            return value.to(dtype=kwargs.get("dtype") or value.dtype, copy=True)
        return None

    def dispatch(
        self, run: Dispatch, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run `func` on meta through `run` (the meter), and give its output a twin if knowable."""
        tensors = _flat(args, kwargs)
        twins = [self.twin(t) for t in tensors]
        known = all(v is not None for v in twins)
        if not known and func not in _SPECIAL and not func._schema.is_mutable:
            return run(func, args, kwargs)  # the common case: activations, nothing to know
        if func is aten.bincount.default and args[0].is_meta and twins[0] is None:
            length = int(kwargs.get("minlength", args[2] if len(args) > 2 else 0))
            out = run(aten.empty.memory_format, ([length],), _meta_kwargs(torch.int64))
            self.know(out, uniform_counts(args[0].numel(), length))
            return out
        if func in (aten.topk.default, *_SORTS) and twins[0] is None:
            out = run(func, args, kwargs)
            indices, experts = out[1], args[0].shape[-1]
            at = 2 if func is aten.topk.default else 1  # sort.stable takes dim by keyword only
            dim = kwargs.get("dim", args[at] if len(args) > at else -1)
            if dim in (-1, args[0].dim() - 1) and indices.numel() <= SMALL:
                rows, k = indices.numel() // max(indices.shape[-1], 1), indices.shape[-1]
                # top-k: row t picks (t·k + j) mod E; a full sort: the rotation starting at t
                start = torch.arange(rows) * (k if func is aten.topk.default else 1)
                value = (start.unsqueeze(1) + torch.arange(k)) % experts
                self.know(indices, value.view(indices.shape))
            return out
        out = None
        try:
            out = run(func, args, kwargs)
        except (RuntimeError, NotImplementedError):
            if not (known and tensors):  # nothing to size the output by
                raise
        if func is aten.index_add.default and self.twin(args[0]) is not None:
            source = self.twin(args[3])
            if source is not None and twins.count(None) == 1 and bool((source == 1).all()):
                value = self.twin(args[0]).clone()  # type: ignore[union-attr]
                value += uniform_counts(args[2].numel(), value.shape[0]).to(value.dtype)
                self.know(out, value)
                return out
        factory = not tensors and kwargs.get("device") == torch.device("meta")
        if (known and (tensors or factory)) or func in _LIKE:
            like = func in _LIKE and not known
            value = self._on_cpu(func, args, kwargs, like)
            if value is not None:
                if out is None:  # a value-dependent size: a meta output of the twin's size
                    out = tree_map(lambda v: _meta_like(run, v), value)
                self.know(out, value)
            elif func._schema.is_mutable and args and isinstance(args[0], torch.Tensor):
                self._twins.pop(id(args[0]), None)
        elif func._schema.is_mutable and args and isinstance(args[0], torch.Tensor):
            self._twins.pop(id(args[0]), None)  # written with unknown values
        if out is None:
            raise RuntimeError(f"{func}: its output size depends on values the trace lacks")
        return out

    def _on_cpu(self, func: Any, args: Any, kwargs: dict[str, Any], like: bool) -> Any:
        numel = [t.numel() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(n > SMALL for n in numel):
            return None
        kwargs = {k: torch.device("cpu") if k == "device" else v for k, v in kwargs.items()}
        if like:
            first = args[0]
            args = (torch.empty(first.shape, dtype=first.dtype), *args[1:])
        else:
            args = tree_map(lambda t: self.twin(t) if isinstance(t, torch.Tensor) else t, args)
            kwargs = tree_map(lambda t: self.twin(t) if isinstance(t, torch.Tensor) else t, kwargs)
        if func.namespace.startswith("_c10d_functional"):
            return _symmetric(func, args)
        try:
            out = func(*args, **kwargs)
        except (RuntimeError, TypeError, NotImplementedError):  # e.g. `set_` to a meta storage
            return None
        return out if all(t.numel() <= SMALL for t in _tensors(out)) else None


def _flat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors among `args` and `kwargs`' values, looking one list deep (an op's schema)."""
    out: list[torch.Tensor] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [b for b in a if isinstance(b, torch.Tensor)]
    return out


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _meta_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    return {"dtype": dtype, "device": torch.device("meta")}


def _meta_like(run: Dispatch, value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return run(aten.empty_strided.default, (value.shape, value.stride()), _meta_kwargs(value.dtype))


def _symmetric(func: Any, args: tuple[Any, ...]) -> Any:
    """A functional collective's output when every rank of the group holds `args[0]`."""
    name = func._overloadpacket.__name__
    if name in ("wait_tensor", "_wrap_tensor_autograd"):
        return args[0]
    if name == "all_to_all_single":
        pg = _resolve_process_group(args[3])
        size, me = pg.size(), dist.get_rank(pg)
        block = args[0].chunk(size)[me] if args[2] is None else _block(args[0], args[2], me)
        return torch.cat([block] * size)
    if name == "all_gather_into_tensor":
        return torch.cat([args[0]] * int(args[1]))
    if name == "all_reduce" and args[1] == "sum":
        return args[0] * _resolve_process_group(args[2]).size()
    return None


def _block(x: torch.Tensor, splits: list[int], index: int) -> torch.Tensor:
    start = sum(splits[:index])
    return x[start : start + splits[index]]
