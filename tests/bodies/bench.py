"""Rank bodies for benchmarks/: step time of moetx vs hand-written torch calls, and bytes held."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees, ParallelMesh
from moetx.passes import ExpertParallel
from moetx.structure.tensors import local_bytes
from moetx.testing.train import TrainSpec, build_model, global_batches, mesh_for


def hand_parallelize(model: Any, mesh: ParallelMesh, *, ep: bool) -> nn.Module:
    """The same parallelization written out with torch's own calls, torchtitan `apply_fsdp` style.

    Expert parallelism has no torch equivalent, so it uses moetx's `ExpertParallel`; FSDP is
    written by hand: expert units on the expert mesh with the world-size divide factor, one
    unit per block, embedding, lm head, root.
    """
    if ep:
        model = ExpertParallel().apply(model, mesh)
    dense = mesh.dense_fsdp_mesh()
    for block in model.model.layers:
        if ep and isinstance(block.mlp.experts.gate_up_proj, DTensor):
            emesh = mesh.expert_fsdp_mesh()
            fully_shard(block.mlp.experts, mesh=emesh, shard_placement_fn=lambda p: Shard(0))
            block.mlp.experts.set_gradient_divide_factor(float(mesh.world_size))
            if emesh.size() > 1:
                block.mlp.experts.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=dense)
    fully_shard(model.model.embed_tokens, mesh=dense)
    fully_shard(model.lm_head, mesh=dense)
    fully_shard(model, mesh=dense)
    return model


def _adam_bytes(opt: torch.optim.Optimizer) -> int:
    return local_bytes(
        v
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.ndim > 0
    )


def compare_step_time(
    spec: TrainSpec,
    pipeline: Pipeline,
    degrees: MeshDegrees,
    *,
    ep: bool,
    warmup: int = 2,
    steps: int = 7,
) -> dict[str, Any]:
    """Interleave steps of the moetx-parallelized and the hand-parallelized model; report both."""
    mesh = mesh_for(degrees)
    models = {
        "moetx": pipeline.apply(build_model(spec), mesh),
        "hand": hand_parallelize(build_model(spec), mesh, ep=ep),
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=spec.lr) for k, m in models.items()}
    ids, labels = global_batches(spec, degrees.world_size)[0]
    rank = dist.get_rank()
    rows = slice(rank * spec.rows_per_rank, (rank + 1) * spec.rows_per_rank)
    times: dict[str, list[float]] = {k: [] for k in models}
    out: dict[str, Any] = {}
    for i in range(warmup + steps):
        for k, m in models.items():
            dist.barrier()
            start = time.perf_counter()
            m(ids[rows], labels=labels[rows]).loss.backward()
            if i == warmup + steps - 1:
                out[f"{k}_grad_bytes"] = local_bytes(
                    p.grad for p in m.parameters() if p.grad is not None
                )
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if i >= warmup:
                times[k].append(time.perf_counter() - start)
    for k, m in models.items():
        out[f"{k}_median_s"] = statistics.median(times[k])
        out[f"{k}_param_bytes"] = local_bytes(m.parameters())
        out[f"{k}_adam_bytes"] = _adam_bytes(opts[k])
    out["total_param_bytes"] = sum(
        p.numel() * p.element_size() for p in build_model(spec).parameters()
    )
    return out
