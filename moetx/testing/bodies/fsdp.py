"""Rank bodies for the FSDP tests: placements and byte counts of a parallelized model."""

from __future__ import annotations

from typing import Any

from torch.distributed.tensor import DTensor

from moetx._mesh import MeshDegrees
from moetx._pipeline import Pipeline
from moetx.testing.train import TrainSpec, build_model, mesh_for


def placements(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """FQN -> (mesh dim names, placements as strings, local numel) after `pipeline`."""
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    out: dict[str, Any] = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            out[name] = (
                tuple(p.device_mesh.mesh_dim_names or ()),
                tuple(repr(pl) for pl in p.placements),
                p.to_local().numel(),
                p.numel(),
            )
        else:
            out[name] = ((), (), p.numel(), p.numel())
    return out


def tied_after_fsdp(spec: TrainSpec, degrees: MeshDegrees) -> bool:
    """Whether the lm head and the input embedding still share one parameter after FSDP."""
    from moetx.passes._fsdp import FSDP

    model = FSDP().apply(build_model(spec), mesh_for(degrees))
    return model.lm_head.weight is model.model.embed_tokens.weight
