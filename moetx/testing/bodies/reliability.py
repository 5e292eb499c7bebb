"""Rank bodies for the reliability tests: non-finite clipping, timeouts, group leaks, CP input.

Like every body module: each function runs on every rank, returns plain values and asserts
nothing (the parent compares). Failures the tests are about are caught here and returned as
`(type name, first message line)` so that every rank's outcome reaches the parent.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moetx._clip import clip_grad_norm_
from moetx._mesh import MeshDegrees
from moetx._pipeline import Pipeline
from moetx.testing.bodies.end_to_end import _data_rank, rank_batches
from moetx.testing.parity import clean_fqn, gradients, missing_gradients
from moetx.testing.train import TrainSpec, build_model, mesh_for

# ------------------------------------------------------------------------- non-finite clipping


def nonfinite_clip(
    spec: TrainSpec,
    pipeline: Pipeline,
    degrees: MeshDegrees,
    *,
    expert: bool,
    index: int,
    element: int,
    on_rank: int,
    value: float,
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
    global_rows: int,
) -> dict[str, Any]:
    """One backward, then `value` (NaN/inf) written into one rank's shard of one gradient.

    The gradient is the `index`-th (modulo) sharded expert (`expert`) or dense gradient in
    parameter order; `element` (modulo the shard size) picks the entry, on rank `on_rank`
    only. Returns the full gradients before clipping, which parameters had none, and either
    the norm and full gradients after `clip_grad_norm_` or the error it raised.
    """
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    data_ranks, data_rank = _data_rank(degrees)
    ids, labels = rank_batches(spec, global_rows, data_ranks, data_rank)[0]
    model(ids, labels=labels).loss.backward()
    candidates = [
        (clean_fqn(name), p.grad)
        for name, p in model.named_parameters()
        if isinstance(p.grad, DTensor) and (".experts." in clean_fqn(name)) == expert
    ]
    name, grad = candidates[index % len(candidates)]
    local = grad.to_local()
    if dist.get_rank() == on_rank and local.numel():
        with torch.no_grad():
            local.view(-1)[element % local.numel()] = value
    out: dict[str, Any] = {
        "target": name,
        "before": gradients(model),
        "missing": missing_gradients(model),
    }
    try:
        out["norm"] = clip_grad_norm_(
            model, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite
        )
    except RuntimeError as exc:
        out["error"] = (type(exc).__name__, str(exc).splitlines()[0])
    out["after"] = gradients(model)
    return out


def torch_clip_reference(
    grads: dict[str, torch.Tensor],
    missing: list[str],
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
) -> dict[str, Any]:
    """Single-process `torch.nn.utils.clip_grad_norm_` on the same full gradients (parent side)."""
    params = {}
    for name, g in grads.items():
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = None if name in missing else g.clone()
        params[name] = p
    out: dict[str, Any] = {}
    try:
        out["norm"] = torch.nn.utils.clip_grad_norm_(
            list(params.values()), max_norm, norm_type, error_if_nonfinite=error_if_nonfinite
        )
    except RuntimeError as exc:
        out["error"] = (type(exc).__name__, str(exc).splitlines()[0])
    out["after"] = {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()
    }
    return out
