"""Rank bodies for `TensorParallel`: placements and typed refusals on real meshes."""

from __future__ import annotations

from typing import Any

from torch.distributed.tensor import DTensor

from moetx import MeshDegrees, MoetxError, Pipeline
from moetx.testing.train import TrainSpec, build_model, mesh_for


def placements(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """Every parameter's mesh dim names and placements (plain tensors: `()`), after `pipeline`."""
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    out: dict[str, Any] = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            out[name] = (p.device_mesh.mesh_dim_names, tuple(str(x) for x in p.placements))
        else:
            out[name] = ()
    return out


def refusal(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """The typed error `pipeline.apply` raises, and whether the model kept its parameters."""
    model = build_model(spec)
    before = {n: p for n, p in model.named_parameters()}
    classes = {n: type(m) for n, m in model.named_modules()}
    try:
        pipeline.apply(model, mesh_for(degrees))
    except MoetxError as e:
        untouched = {n: p for n, p in model.named_parameters()} == before and classes == {
            n: type(m) for n, m in model.named_modules()
        }
        return {"error": type(e).__name__, "message": str(e), "untouched": untouched}
    return {"error": None}
