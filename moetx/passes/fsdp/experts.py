"""The FSDP unit of one MoE layer's routed experts: its mesh, shard dim and gradient scale."""

from __future__ import annotations

import typing
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from moetx.mesh.parallel_mesh import ParallelMesh

__all__ = ["shard_experts"]


def shard_experts(
    experts: nn.Module,
    num_experts: int,
    mesh: ParallelMesh,
    mp_policy: MixedPrecisionPolicy,
    common: dict[str, Any],
) -> None:
    """`fully_shard` the experts `ExpertParallel` split over `ep` on the expert FSDP mesh.

    `common` holds the options every unit shares (`reshard_after_forward`, `offload_policy`).
    """
    emesh = mesh.expert_fsdp_mesh()
    local_experts = num_experts // mesh.degree("ep")
    shards = emesh.size()

    def placement(p: nn.Parameter) -> Shard:
        # Dim 0 is the expert dim; with more shards than local experts it would pad, so
        # shard dim 1 instead (torchtitan#1561). 1-D tensors only have dim 0.
        return Shard(0) if p.ndim == 1 or local_experts % shards == 0 else Shard(1)

    fully_shard(experts, mesh=emesh, shard_placement_fn=placement, mp_policy=mp_policy, **common)
    unit = typing.cast(FSDPModule, experts)
    # Expert grads arrive summed over every rank's tokens (the all-to-all backward returns
    # them to the owner); the global-mean loss needs a division by every token rank (the
    # world; tp ranks hold the same tokens and run their own copy of the experts).
    unit.set_gradient_divide_factor(float(mesh.degrees.token_ranks))
    if shards > 1 and dist.get_backend(emesh.get_group()) == "gloo":
        # gloo has no PREMUL_SUM, which the divide factor uses; not on size-1 meshes,
        # where torch 2.13 would divide twice (notes §4.2).
        unit.set_force_sum_reduction_for_comms(True)
