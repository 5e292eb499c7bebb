"""Rank bodies for tests/test_gpu.py: training parity on the rank's device, gloo (CPU) or NCCL (GPU).

Every body moves the model and the batches to `rank_device()` and returns CPU copies, so the same
body runs in a gloo pool here and in an NCCL pool (one GPU per rank) on a CUDA machine; its gloo
run proves everything but the device plumbing. Rank 0 also trains the untransformed model on the
global batch on its own device (one process, one device): on a GPU machine the parent may have no
usable CUDA context of its own, and the reference must run on the same kind of device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetx import MeshDegrees, Pipeline
from moetx.structure.discovery import discover
from moetx.testing.ranks import rank_device
from moetx.testing.train import TrainSpec, _rank_setup, build_model, global_batches, mesh_for, train


def _on(device: torch.device, batch: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(t if t is None else t.to(device) for t in batch)


def _watch_router(model: nn.Module) -> dict[str, torch.dtype]:
    """Record, at each forward of the first router: the dtype of the weight it computes with
    (after any FSDP all-gather and cast), of the stored parameter, and of its scores."""
    router = discover(model).moe_layers()[0].router
    seen: dict[str, torch.dtype] = {}

    def before(module: nn.Module, args: Any) -> None:
        seen["compute_weight"] = module.get_parameter("weight").dtype

    def after(module: nn.Module, args: Any, out: tuple[torch.Tensor, ...]) -> None:
        seen["scores"] = out[2].dtype

    router.register_forward_pre_hook(before)
    router.register_forward_hook(after)
    return seen


def _stored_router_dtype(model: nn.Module) -> torch.dtype:
    return discover(model).moe_layers()[0].router.get_parameter("weight").dtype


def device_train(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """Rank body: `pipeline` on this rank's device, trained on its part of every global batch.

    Returns `moetx.testing.train.train`'s results (CPU copies: losses, full gradients per step,
    final full parameters), the device the parameters live on, the router dtypes seen in forward
    and stored; rank 0 adds `"reference"`: the same for one process on the global batches.
    """
    device = rank_device()
    model, batches = _rank_setup(spec, pipeline, degrees)  # on `device`
    router = _watch_router(model)
    result = train(model, batches, spec.lr)
    local = next(iter(model.parameters()))
    result["device"] = str(getattr(local, "to_local", lambda: local)().device)
    result["router"] = {**router, "stored": _stored_router_dtype(model)}
    if dist.get_rank() == 0:
        result["reference"] = _reference(spec, mesh_for(degrees).data_size, device)
    return result


def _reference(spec: TrainSpec, data_ranks: int, device: torch.device) -> dict[str, Any]:
    model = build_model(spec).to(device)
    router = _watch_router(model)
    batches = [_on(device, b) for b in global_batches(spec, data_ranks)]
    result = train(model, batches, spec.lr, param_dtype=spec.param_dtype)
    result["router"] = {**router, "stored": _stored_router_dtype(model)}
    return result


def device_of_rank() -> str:
    """Rank body: `str(rank_device())`, after one all-reduce on it (proves the group uses it)."""
    device = rank_device()
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    return f"{device} sum={int(t.item())}"
