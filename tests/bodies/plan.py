"""Rank bodies for the plan tests: what real ranks hold, to compare with `moetx.planning.plan.plan`."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moetx.core.algebra import Pass, Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.testing.train import TrainSpec, build_model, global_batches, mesh_for


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(tensors: Any) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def _batch(spec: TrainSpec, pipeline: Pipeline | Pass, degrees: MeshDegrees) -> dict[str, Any]:
    """This rank's rows of the first global batch (and its sequence part under cp)."""
    from moetx.passes import ContextParallel

    ids, labels = global_batches(spec, degrees.dp_replicate * degrees.dp_shard)[0]
    index = mesh_for(degrees).data_rank
    rows = slice(index * spec.rows_per_rank, (index + 1) * spec.rows_per_rank)
    passes = pipeline.passes if isinstance(pipeline, Pipeline) else (pipeline,)
    cp = next((p for p in passes if isinstance(p, ContextParallel)), None)
    if cp is None or degrees.cp == 1:
        return {"input_ids": ids[rows], "labels": labels[rows]}
    part, part_labels, positions = cp.shard_sequence(mesh_for(degrees), ids[rows], labels[rows])
    return {"input_ids": part, "labels": part_labels, "position_ids": positions}


def held_bytes(spec: TrainSpec, pipeline: Pipeline | Pass, degrees: MeshDegrees) -> dict[str, Any]:
    """One AdamW step; the bytes of local parameter, gradient and AdamW-moment shards."""
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr)
    model(**_batch(spec, pipeline, degrees)).loss.backward()
    opt.step()
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return {
        "params": _nbytes(model.parameters()),
        "grads": _nbytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer": _nbytes(moments),
        "shapes": {n: tuple(_local(p).shape) for n, p in model.named_parameters()},
    }


def gathered_after_forward(spec: TrainSpec, pipeline: Pipeline | Pass, degrees: MeshDegrees) -> int:
    """Bytes of FSDP2 all-gather outputs still allocated after one forward (no backward)."""
    from torch.distributed.fsdp import FSDPModule

    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    model(**_batch(spec, pipeline, degrees))
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        # Private FSDP2 state: the only way to see which gathered buffers are still allocated.
        group = module._get_fsdp_state()._fsdp_param_group  # type: ignore[attr-defined]
        for fsdp_param in group.fsdp_params if group is not None else ():
            post = getattr(fsdp_param, "_sharded_post_forward_param_data", None)
            kept = [*fsdp_param.all_gather_outputs, post]
            for out in (t for t in kept if t is not None):  # the latter: int reshard_after_forward
                storage = out.untyped_storage()
                if id(storage) not in seen:
                    seen.add(id(storage))
                    total += storage.nbytes()
    return total


def plan_here(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, *, use_mesh: bool, only_rank0: bool
) -> Any:
    """Plan inside the pool's real process group; returns (params, grads, optimizer) or None.

    `use_mesh` passes the rank's cached ParallelMesh (otherwise the degrees); `only_rank0`
    plans on rank 0 alone, which would hang if planning ran a collective.
    """
    from moetx.planning.plan import plan

    # Every rank builds the mesh: creating its groups is collective.
    where = mesh_for(degrees) if use_mesh else degrees
    if only_rank0 and dist.get_rank() != 0:
        return None
    model: nn.Module = build_model(spec, meta=True)
    p = plan(pipeline, model, where, rank=dist.get_rank())
    return [(r.params, r.grads, r.optimizer) for r in p.ranks]
