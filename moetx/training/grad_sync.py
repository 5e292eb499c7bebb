"""Gradient averaging for pipelines without FSDP (`ExpertParallel()` alone, CP alone, CP | EP | AC).

FSDP reduces gradients itself; without it nothing does, and ranks silently drift apart. This is
the reduction FSDP would do, by hand because no torch API covers DTensor expert shards and plain
dense parameters at once (DDP refuses DTensor parameters): dense gradients are averaged over
token rank (dp x cp: the world without tp, whose ranks hold the same tokens), tensor-parallel
shards with them (each token rank holds its own copy of the same shard); expert shards
(`Shard(0)` DTensors on `ep`, whose gradients already hold every token of their ep group) are
summed over the ranks that hold the same experts (dp_replicate x ep_shard: the expert-FSDP mesh)
and divided by the number of token ranks, as FSDP's divide factor does. Dense gradients travel
in one flat all-reduce per dtype. A model whose routing-load counters no pass sums over the
token ranks is refused (`LoadSyncError`): after the fact, nothing tells a counter's local part
from what it held before, so the counts cannot be made global here.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from moetx.core.errors import GradientSyncError, LoadSyncError
from moetx.core.record import applied_passes, find_applied
from moetx.mesh import ParallelMesh, as_parallel_mesh
from moetx.passes.load_sync import local_load_layers

__all__ = ["sync_gradients"]


def sync_gradients(model: nn.Module, mesh: ParallelMesh | DeviceMesh) -> None:
    """Average `model`'s gradients over the data and cp ranks, in place, after `backward`.

    Call it on every rank between `loss.backward()` and `optimizer.step()` when the pipeline has
    no `FSDP`. A trainable parameter without a gradient gets zeros first (every rank then joins
    the same collectives, and its optimizer state stays in step with the other ranks').

    Raises:
        GradientSyncError: the model has `FSDP` (which already reduces gradients), or a DTensor
            parameter that expert parallelism did not create.
        LoadSyncError: more than one token rank, and MoE layers whose aux-loss-free load
            counters count only this rank's tokens (no moetx pass was applied on this mesh):
            `update_routing_bias_` would move each rank's bias its own way. Raised before any
            gradient is touched.
    """
    pmesh = as_parallel_mesh(mesh)
    record = applied_passes(model)
    if find_applied(record, "fsdp") is not None:
        raise GradientSyncError(
            "`sync_gradients` on a model with `FSDP`: FSDP already averages gradients in "
            "backward, so they would be reduced twice.\n"
            "  fix: drop the `sync_gradients` call (keep it only for pipelines without FSDP)."
        )
    world = pmesh.degrees.token_ranks
    counting = local_load_layers(model) if world > 1 else ()
    if counting:
        shown = ", ".join(f"`{f}`" for f in counting[:3]) + (", ..." if len(counting) > 3 else "")
        raise LoadSyncError(
            f"`sync_gradients` on {world} token ranks, but the routing-load counters of "
            f"{len(counting)} MoE layer(s) ({shown}) count only this rank's tokens: "
            "`update_routing_bias_` would move each rank's routing bias its own way.\n"
            "  fix: call `moetx.sync_routing_load(model, mesh)` once before the first forward "
            "(every moetx pass applied on this mesh does it for you)."
        )
    ep = find_applied(record, "ep")
    experts = set(ep.facts.get("expert_params", ())) if ep is not None else set()
    tp = find_applied(record, "tp")
    tp_axis = tp.facts.get("axis", "tp") if tp is not None else "tp"
    dense: dict[torch.dtype, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if isinstance(p.grad, DTensor) and name not in experts:
            if p.grad.device_mesh.mesh_dim_names != (tp_axis,):
                raise GradientSyncError(
                    f"`{name}` is a DTensor that neither `ExpertParallel` nor `TensorParallel` "
                    "created; `sync_gradients` only knows their shards and plain parameters.\n"
                    "  fix: apply `FSDP()`, which reduces any DTensor parameter."
                )
            # A tensor-parallel shard (or tp-replicated norm weight): its peers on the other
            # token ranks hold the same shard, so it averages like a dense gradient. A pending
            # (Partial) tp sum is settled first.
            if any(pl.is_partial() for pl in p.grad.placements):
                p.grad = p.grad.redistribute(p.grad.device_mesh, cast(DTensor, p).placements)
            dense.setdefault(p.grad.dtype, []).append(p.grad.to_local())
        elif isinstance(p.grad, DTensor):
            local = p.grad.to_local()
            replicas = pmesh.expert_fsdp_mesh()
            if replicas.size() > 1:
                dist.all_reduce(local, group=replicas.get_group())
            local.div_(world)
        else:
            dense.setdefault(p.grad.dtype, []).append(p.grad)
    if world == 1:
        return
    for grads in dense.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=pmesh.tokens.get_group())
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
