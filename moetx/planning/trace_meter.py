"""`TracingMeter`: the dispatch mode `predict`'s meta trace runs under (`predict_activations`).

A `LiveActivationMeter` that also tags every op output with the block that made it, gives a
balanced router's values to what the host reads on meta, counts forward FLOPs with
`torch.utils.flop_counter`'s formulas and, per block, what each checkpoint mode's
recomputation would rerun (up to the block's last saved tensor).

Under tensor parallelism an op on DTensors is not counted at the DTensor level, where shapes are
global: the mode answers `NotImplemented`, DTensor runs it (the mode stays on the stack), and the
local ops it issues, at the rank's shard shapes, redistributions included, come back through the
mode on plain tensors; the ops DTensor's sharding propagation runs on fake tensors (global shapes,
no kernel) pass through uncounted. So FLOPs are a rank's, as its kernels run them (issue 18).
"""

from __future__ import annotations

import weakref
from collections import Counter, defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import flop_registry

from moetx.passes.activation_checkpoint import MODES, SAVED_OPS
from moetx.passes.activation_checkpoint.contexts import router_saves
from moetx.planning.meta_values import MetaValues
from moetx.planning.meter import LiveActivationMeter, _storages

__all__ = ["OUTSIDE", "FlashOnMeta", "TracingMeter"]

aten = torch.ops.aten
#: The block index of ops outside every block.
OUTSIDE = -1
_FAKE = torch._C._TorchDispatchModeKey.FAKE
#: Reductions whose 0-dim boolean answer a Python `if` may read. On meta it has no value; the
#: trace answers True: Hugging Face forwards ask only whether their inputs are the plain case
#: (`find_packed_sequence_indices`: "no packed sequences", `(mask[:, -1] == 0).all()`), and the
#: trace's inputs are (one `arange` of positions per row, no padding).
_PLAIN = (aten.all.default, aten.all.dim, aten.all.dims)


class FlashOnMeta(TorchFunctionMode):
    """SDPA on meta tensors through the CPU flash kernel's meta function (what a device runs);
    `torch.tensor(data, device="meta")` (no dispatch sees it) gets its data as a twin."""

    def __init__(self, values: MetaValues) -> None:
        super().__init__()
        self.values = values

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.tensor and torch.device(kwargs.get("device") or "cpu").type == "meta":
            out = func(*args, **kwargs)
            self.values.know(out, torch.tensor(args[0], dtype=out.dtype))
            return out
        if func is F.scaled_dot_product_attention and args[0].is_meta:
            q, k, v = args[:3]
            causal, scale = kwargs.get("is_causal", False), kwargs.get("scale")
            return aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, causal, scale=scale
            )[0]
        return func(*args, **kwargs)


def _attention_flops(q: torch.Tensor, k: torch.Tensor, causal: bool) -> int:
    b, h, s, d = q.shape
    full = 4 * b * h * s * k.shape[-2] * d
    return full // 2 if causal and s == k.shape[-2] else full


class TracingMeter(LiveActivationMeter):
    """`LiveActivationMeter` + block tags, uniform routing on meta, and a FLOP count."""

    def __init__(self, exclude: Any = ()) -> None:
        super().__init__(exclude)
        self.block = OUTSIDE
        self.in_experts = False
        self.in_router = False
        self.tags: dict[int, int] = {}
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        self.flops: defaultdict[int, int] = defaultdict(int)
        self.expert_flops = 0
        # Per block, the FLOPs recomputing it in each mode would rerun so far ((mode, False):
        # all, (mode, True): in experts), and their values at the block's latest pack.
        self.rerun: defaultdict[int, Counter[tuple[str, bool]]] = defaultdict(Counter)
        self.at_pack: dict[int, Counter[tuple[str, bool]]] = {}
        self.values = MetaValues()
        self._plain: dict[int, weakref.ref[torch.Tensor]] = {}

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs it; its local ops come back here
        if torch._C._get_dispatch_mode(_FAKE) is not None:
            return func(*args, **kwargs)  # DTensor's sharding propagation (global shapes)
        if args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            read = self.values.host_read(func, args, kwargs)
            if read is not None:
                return read
            plain = self._plain.get(id(args[0]))
            if func is aten._local_scalar_dense.default and plain and plain() is args[0]:
                return True  # see `_PLAIN`

        def run(f: Any, a: tuple[Any, ...], k: dict[str, Any]) -> Any:
            return LiveActivationMeter.__torch_dispatch__(self, f, types, a, k)

        if func is aten._grouped_mm.default and args[0].is_meta and args[1].dim() == 3:
            # HF's experts on CPU (fp32): the meta function accepts bf16 only, the kernel any.
            size = [args[0].shape[0], args[1].shape[-1]]
            dtype = kwargs.get("out_dtype") or args[0].dtype
            out = run(aten.empty.memory_format, (size,), {"dtype": dtype, "device": "meta"})
        else:
            out = self.values.dispatch(run, func, args, kwargs)
        if (
            func in _PLAIN
            and isinstance(out, torch.Tensor)
            and out.is_meta
            and out.dtype == torch.bool
            and out.dim() == 0
        ):
            self._plain[id(out)] = weakref.ref(out)
        flops = 0
        if func is aten._grouped_mm.default and args[1].dim() == 3:
            flops = 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[-1]
        elif func._overloadpacket in flop_registry:
            flops = int(flop_registry[func._overloadpacket](*args, **kwargs, out_val=out))
        elif func is aten._scaled_dot_product_flash_attention_for_cpu.default:
            causal = kwargs.get("is_causal", args[4] if len(args) > 4 else False)  # default: gone
            flops = _attention_flops(args[0], args[1], bool(causal))
        if flops:
            self.flops[self.block] += flops
            if self.in_experts:
                self.expert_flops += flops
            for mode in self._rerun_by(func):
                self.rerun[self.block][mode, False] += flops
                self.rerun[self.block][mode, True] += flops if self.in_experts else 0
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                for s in _storages(t):
                    self._tag(s)
        return out

    def _rerun_by(self, func: Any) -> tuple[str, ...]:
        """The checkpoint modes whose recomputation reruns `func` (the others' caches answer it)."""
        if self.in_router and router_saves(func):
            return ("full",)
        return ("full", "router") if func in SAVED_OPS else MODES

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """A `saved_tensors_hooks` pack: recomputing the block would run up to here."""
        if self.block != OUTSIDE:
            self.at_pack[self.block] = Counter(self.rerun[self.block])
        return t

    def _tag(self, storage: torch.UntypedStorage) -> None:
        # Keyed by id, so a storage that died and whose id was reused gets the new tag.
        ref = self._refs.get(id(storage))
        if ref is None or ref() is not storage:
            self._refs[id(storage)] = weakref.ref(storage)
            self.tags[id(storage)] = self.block
