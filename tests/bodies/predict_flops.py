"""Rank bodies for the FLOPs predictions: `FlopCounterMode`'s count of one forward + backward,
with formulas for the kernels it does not count (CPU flash attention, `_grouped_mm`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.testing.train import TrainSpec, build_model, mesh_for
from tests.bodies.plan import _batch

__all__ = ["UNCOUNTED", "count_step", "rank_flops"]

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
