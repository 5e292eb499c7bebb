"""Rank bodies for `benchmarks/step_anatomy.py`: one training step taken apart.

For a pipeline on real ranks (gloo on the CPU, or NCCL with one GPU each: models and batch live on
`rank_device()`, and times wait for the device): the step time, the time of the same model without any
parallelism on this rank's share of the batch (compute only), and every collective of one step
by kind, mesh axis and bytes.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

from moetx import ActivationCheckpoint, ContextParallel, MeshDegrees, ParallelMesh, Pipeline
from moetx.testing.ranks import rank_device
from moetx.testing.train import TrainSpec, build_model, global_batches, mesh_for


def _kind(op: str) -> str:
    name = op.strip("_").replace("allgather", "all_gather").replace("allreduce", "all_reduce")
    for kind in ("all_gather", "reduce_scatter", "all_to_all", "all_reduce", "broadcast"):
        if kind in name or kind.replace("_", "") in name:
            return kind
    return name


def _group_name(arg: Any) -> str | None:
    if isinstance(arg, str):  # functional collectives name their group
        return arg
    if isinstance(arg, torch.ScriptObject):  # c10d ops carry the ProcessGroup itself
        try:
            return str(dist.ProcessGroup.unbox(arg).group_name)
        except (RuntimeError, TypeError):
            return None
    return None


def axis_names(mesh: ParallelMesh) -> dict[str, str]:
    """Process-group name -> the mesh axes that use it (`a=b` when several share one group)."""
    meshes: list[tuple[str, DeviceMesh]] = [("world", mesh.root)]
    meshes += [(a, mesh.fsdp[a]) for a in ("dp_replicate", "dp_shard_cp")]
    meshes += [(a, mesh.dense[a]) for a in ("dp_shard", "cp", "tp")]
    meshes += [(a, mesh.moe[a]) for a in ("ep_shard", "ep")]
    meshes += [("ep_fsdp", mesh.expert_fsdp), ("tokens", mesh.tokens)]
    out: dict[str, list[str]] = {}
    for axis, dm in meshes:
        if dm.size() > 1:
            out.setdefault(dm.get_group().group_name, []).append(axis)
    return {g: "=".join(dict.fromkeys(axes)) for g, axes in out.items()}


class AxisCounter(TorchDispatchMode):
    """Counts every collective (functional and c10d) by (kind, axis), with its buffer bytes.

    The bytes of a collective are its largest tensor argument: the gathered tensor of an
    all-gather, the unreduced one of a reduce-scatter, what this rank sends in an all-to-all.
    Integer collectives (the dispatcher's token counts) are their own kind, `... int64`.
    """

    def __init__(self, axes: dict[str, str]) -> None:
        super().__init__()
        self.axes = axes
        self.calls: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        op = func._overloadpacket.__name__
        if func.namespace in ("_c10d_functional", "c10d") and not op.startswith(
            ("wait", "barrier", "monitored", "_wrap_tensor")
        ):
            flat = [*args, *(kwargs or {}).values()]
            tensors = [t for a in flat for t in (a if isinstance(a, list) else [a])]
            tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
            group = next((g for g in map(_group_name, reversed(flat)) if g is not None), "?")
            kind = _kind(op)
            if tensors and not tensors[0].is_floating_point():
                kind += f" {str(tensors[0].dtype).removeprefix('torch.')}"
            key = (kind, self.axes.get(group, f"group {group}"))
            self.calls[key] += 1
            self.bytes[key] += max((t.numel() * t.element_size() for t in tensors), default=0)
        return func(*args, **(kwargs or {}))


def _batch(spec: TrainSpec, pipeline: Pipeline, mesh: ParallelMesh) -> dict[str, Any]:
    ids, labels = global_batches(spec, mesh.data_size)[0]
    rows = slice(mesh.data_rank * spec.rows_per_rank, (mesh.data_rank + 1) * spec.rows_per_rank)
    batch: dict[str, Any] = {"input_ids": ids[rows], "labels": labels[rows]}
    cp = next((p for p in pipeline if isinstance(p, ContextParallel)), None)
    if cp is not None and mesh.degrees.cp > 1:  # cp ranks share rows; each takes its part
        part, part_labels, positions = cp.shard_sequence(mesh, ids[rows], labels[rows])
        batch = {"input_ids": part, "labels": part_labels, "position_ids": positions}
    device = rank_device()
    return {k: v.to(device) for k, v in batch.items()}


def _sync() -> None:
    """Wait for the device's queued work (CUDA), so a wall-clock time covers it."""
    if rank_device().type == "cuda":
        torch.cuda.synchronize()


def anatomy(
    spec: TrainSpec,
    pipelines: list[Pipeline],
    degrees: MeshDegrees,
    *,
    warmup: int = 2,
    steps: int = 5,
) -> list[dict[str, Any]]:
    """Median step times of `pipelines` and of compute only, interleaved; one step's collectives.

    The pipelines must differ only after their distributed passes (e.g. in FSDP options): their
    steps take turns with each other and with compute only, so load on a shared machine weighs
    on all of them alike. Compute only is the model without parallelism (but with activation
    checkpointing when the pipelines have it: recomputation is compute) on this rank's part of
    the batch, with the same optimizer; every rank runs it at the same time, as in the real
    step, so the ratio step / compute is what communication and waiting cost.
    """
    mesh = mesh_for(degrees)
    batch = _batch(spec, pipelines[0], mesh)
    device = rank_device()
    models = [p.apply(build_model(spec).to(device), mesh) for p in pipelines]
    compute = build_model(spec).to(device)
    ac = next((p for p in pipelines[0] if isinstance(p, ActivationCheckpoint)), None)
    if ac is not None:
        compute = ac.apply(compute, mesh)
    models.append(compute)
    opts = [torch.optim.AdamW(m.parameters(), lr=spec.lr) for m in models]

    def step(i: int) -> None:
        models[i](**batch).loss.backward()
        opts[i].step()
        opts[i].zero_grad(set_to_none=False)

    times: list[list[float]] = [[] for _ in models]
    for n in range(warmup + steps):
        for i in range(len(models)):
            _sync()
            dist.barrier()
            start = time.perf_counter()
            step(i)
            _sync()
            if n >= warmup:
                times[i].append(time.perf_counter() - start)
    out = []
    for i in range(len(pipelines)):
        counter = AxisCounter(axis_names(mesh))
        dist.barrier()
        with counter:
            step(i)
        out.append(
            {
                "step_s": statistics.median(times[i]),
                "compute_s": statistics.median(times[-1]),
                "calls": dict(counter.calls),
                "bytes": dict(counter.bytes),
            }
        )
    return out


def step_collectives(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, int]:
    """Collectives of the second training step (after FSDP2's lazy init), counted by kind."""
    mesh = mesh_for(degrees)
    batch = _batch(spec, pipeline, mesh)
    model = pipeline.apply(build_model(spec).to(rank_device()), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    counter = AxisCounter(axis_names(mesh))
    for i in range(2):
        with counter if i else contextlib.nullcontext():
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    kinds: Counter[str] = Counter()
    for (kind, _), n in counter.calls.items():
        kinds[kind] += n
    return dict(kinds)
