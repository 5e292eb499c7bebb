"""Rank bodies for the FLOPs predictions: `FlopCounterMode`'s count of one forward + backward,
with formulas for the kernels it does not count (CPU flash attention, `_grouped_mm`); under tensor
parallelism, the same formulas on the local kernels a rank runs (`LocalFlops`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, shape_wrapper

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.testing import hf
from moetx.testing.train import TrainSpec, build_model, mesh_for
from tests.bodies.plan import _batch

__all__ = [
    "UNCOUNTED",
    "LocalFlops",
    "count_step",
    "hf_rank_local_flops",
    "local_step",
    "rank_flops",
    "rank_local_flops",
]

aten = torch.ops.aten


def _causal_attention(q: Any, k: Any, causal: bool) -> int:
    """`predict`'s convention: 4·b·h·s_q·s_k·d, halved when causal (the masked half is skipped)."""
    b, h, s, d = q
    full = 4 * b * h * s * k[-2] * d
    return full // 2 if causal and s == k[-2] else full


def _flash(q: Any, k: Any, v: Any, dropout: float = 0.0, is_causal: bool = False, **_: Any) -> int:
    return _causal_attention(q, k, is_causal)


def _flash_backward(
    grad: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, dropout: float, is_causal: bool, **_: Any
) -> int:
    return 2 * _causal_attention(q, k, is_causal)  # backward: twice forward, as `predict` counts


def _grouped_mm(a: Any, b: Any, *args: Any, **_: Any) -> int:
    """2·numel(a)·N: every element of `a` (whose last dim is the contracted one) meets the `N`
    output columns of its group (`b`'s last dim), whether `b` or the contraction is grouped."""
    return 2 * math.prod(a) * b[-1]


#: What `FlopCounterMode` does not count: the CPU flash-attention kernels and `_grouped_mm`
#: (Hugging Face's experts). These formulas count each call (forward, recomputed forward,
#: backward), so whether recomputation reruns attention or experts is measured, not assumed.
UNCOUNTED = {
    aten._scaled_dot_product_flash_attention_for_cpu: _flash,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_backward,
    aten._grouped_mm: _grouped_mm,
}


def count_step(model: Any, batch: dict[str, Any]) -> int:
    """`FlopCounterMode`'s count (with `UNCOUNTED`) of one forward + backward of `model`."""
    with FlopCounterMode(display=False, custom_mapping=UNCOUNTED) as counter:
        model(**batch).loss.backward()
    return int(counter.get_total_flops())


def rank_flops(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> int:
    """This rank's counted FLOPs of one step of `spec`'s model under `pipeline`."""
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    return count_step(model, _batch(spec, pipeline, degrees))


class LocalFlops(TorchDispatchMode):
    """The FLOPs of the kernels this rank runs: `FlopCounterMode`'s formulas (and `UNCOUNTED`)
    on plain tensors only. An op on DTensors is handed back to DTensor (`NotImplemented`, the
    mode stays on the stack), so the local ops it runs, at the rank's shard shapes, come back
    here; the ops DTensor runs under a `FakeTensorMode` to propagate shapes are not kernels.

    Attributes:
        flops: The count so far.
        matmuls: The part of it in `mm` / `addmm` / `bmm` (the kernels tp shards).
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.matmuls = 0
        self.formulas = {
            **flop_registry, **{k: shape_wrapper(v) for k, v in UNCOUNTED.items()}
        }  # fmt: skip

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None and torch._C._get_dispatch_mode(_FAKE) is None:
            flops = int(formula(*args, **kwargs, out_val=out))
            self.flops += flops
            if func._overloadpacket in (aten.mm, aten.addmm, aten.bmm):
                self.matmuls += flops
        return out


_FAKE = torch._C._TorchDispatchModeKey.FAKE


def local_step(model: Any, batch: dict[str, Any]) -> dict[str, int]:
    """`LocalFlops`' counts of one forward + backward of `model`: `flops`, `matmuls`."""
    with LocalFlops() as counter:
        model(**batch).loss.backward()
    return {"flops": counter.flops, "matmuls": counter.matmuls}


def profiled_matmuls(model: Any, batch: dict[str, Any]) -> int:
    """The matmul FLOPs of one forward + backward as the profiler records the kernels, a count
    independent of dispatch modes: the `mm` / `addmm` / `bmm` events that call no other (an op
    on DTensors calls its local op; `2·m·k·n` from the recorded input shapes). Run it on a warm
    model (DTensor's sharding propagation, which runs ops on fake tensors, is then cached) and
    without checkpointing (the profiler also records the op whose saved input stops the
    recomputation, which never runs)."""
    names = ("aten::mm", "aten::addmm", "aten::bmm")
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        model(**batch).loss.backward()
    total = 0
    for event in prof.events():
        if event.name not in names:
            continue
        stack, inner = list(event.cpu_children), False
        while stack and not inner:
            child = stack.pop()
            inner = child.name in names
            stack += child.cpu_children
        if inner:
            continue
        a, b = event.input_shapes[1:3] if event.name == "aten::addmm" else event.input_shapes[:2]
        total += 2 * math.prod(a) * b[-1]  # bmm: [B, m, k] x [B, k, n]
    return total


def rank_local_flops(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, profile: bool = False
) -> dict[str, int]:
    """This rank's `local_step` counts of one step of `spec`'s model under `pipeline`, and with
    `profile` the `profiled_matmuls` of a second step (`profiled`)."""
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    batch = _batch(spec, pipeline, degrees)
    counts = local_step(model, batch)
    if profile:
        counts["profiled"] = profiled_matmuls(model, batch)
    return counts


def hf_rank_local_flops(spec: hf.HFSpec, pipeline: Pipeline, degrees: MeshDegrees) -> int:
    """This rank's `local_step` FLOPs of one step of `spec`'s Hugging Face model under
    `pipeline` (tensor parallelism alone: every rank holds the whole batch)."""
    model = pipeline.apply(hf.build_model(spec), mesh_for(degrees))
    ids, labels = hf.global_batches(spec, 1)[0]
    return local_step(model, {"input_ids": ids, "labels": labels})["flops"]
