"""Rank bodies for the reliability tests (issue 13): refused applies and what they leave behind."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, distribute_tensor

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.structure.discovery import discover
from moetx.testing.parity import parameters, snapshot
from moetx.testing.train import Trainer, TrainSpec, build_model, global_batches, mesh_for


def _fully_shard_by_torch(model: nn.Module, degrees: MeshDegrees) -> nn.Module:
    fully_shard(model, mesh=mesh_for(degrees).dense_fsdp_mesh())
    return model


def _dtensor_router(model: nn.Module, degrees: MeshDegrees) -> nn.Module:
    router = discover(model).moe_layers()[0].router
    mesh = mesh_for(degrees).dense_fsdp_mesh()
    router.weight = nn.Parameter(distribute_tensor(router.weight.detach(), mesh, [Replicate()]))
    return model


def _bf16_with_fp32_routers(model: nn.Module, degrees: MeshDegrees) -> nn.Module:
    model.to(torch.bfloat16)
    for layer in discover(model).moe_layers():
        layer.router.float()
    return model


PREPARE = {
    "fully_shard_by_torch": _fully_shard_by_torch,
    "dtensor_router": _dtensor_router,
    "bf16_with_fp32_routers": _bf16_with_fp32_routers,
}
"""Ways a model may arrive at `apply`, by name (the parent sends the name)."""


def try_apply(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, prepare: str | None = None
) -> dict[str, Any]:
    """Apply `pipeline` to this rank's model (first changed by `PREPARE[prepare]`).

    Refused: the error's type and text, and what changed on the model (`snapshot`): nothing, if
    the refusal came before any mutation. Accepted: one training step on this rank's rows, and
    the parameters after it (local values of plain tensors, full values of DTensors).
    """
    model = build_model(spec)
    if prepare is not None:
        model = PREPARE[prepare](model, degrees)
    before = snapshot(model)
    try:
        model = pipeline.apply(model, mesh_for(degrees))
    except Exception as exc:
        return {"error": (type(exc).__name__, str(exc)), "changes": before.changes(model)}
    rows = slice(
        torch.distributed.get_rank() * spec.rows_per_rank,
        (torch.distributed.get_rank() + 1) * spec.rows_per_rank,
    )
    ids, labels = global_batches(spec, degrees.world_size)[0]
    Trainer(model, spec.lr).step((ids[rows], labels[rows]))
    return {"error": None, "params": parameters(model)}
