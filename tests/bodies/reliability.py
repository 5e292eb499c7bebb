"""Rank bodies for the reliability tests: non-finite clipping, timeouts, group leaks, CP input.

Like every body module: each function runs on every rank, returns plain values and asserts
nothing (the parent compares). Failures the tests are about are caught here and returned as
`(type name, first message line)` so that every rank's outcome reaches the parent.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.passes import FSDP
from moetx.passes.context_parallel.api import ContextParallel
from moetx.testing.parity import clean_fqn, gradients, missing_gradients
from moetx.testing.train import TrainSpec, build_model, mesh_for
from moetx.training.clip import clip_grad_norm_
from tests.bodies.end_to_end import _data_rank, rank_batches

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


# -------------------------------------------------------------------------------- timeouts


def _timeout_s(group: dist.ProcessGroup) -> float:
    backend = group._get_backend(torch.device("cpu"))
    return float(backend.options._timeout.total_seconds())  # type: ignore[attr-defined]


def every_group_timeout(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees
) -> dict[str, Any]:
    """Build a mesh, apply `pipeline`, train one step; then the timeout of every group there is.

    Reads torch's group registry, so groups FSDP2 or DeviceMesh create on their own count too.
    Returns the world group's timeout and `{group description: seconds}` for every group.
    """
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    data_ranks, data_rank = _data_rank(degrees)
    ids, labels = rank_batches(spec, data_ranks * spec.rows_per_rank, data_ranks, data_rank)[0]
    model(ids, labels=labels).loss.backward()
    groups = dist.distributed_c10d._world.pg_map
    timeouts = {
        f"{pg.group_desc} {dist.get_process_group_ranks(pg)}": _timeout_s(pg) for pg in groups
    }
    return {"world": _timeout_s(dist.group.WORLD), "groups": timeouts}  # type: ignore[arg-type]


def stall_in_expert_group(degrees: MeshDegrees, stalling: int, stall_s: float) -> dict[str, Any]:
    """Rank `stalling` sleeps `stall_s` s while the others all-reduce on the expert-FSDP group.

    Its expert-FSDP peer waits in the collective for the stalled rank; the others complete.
    Returns how long the all-reduce took and how it ended (`"completed"` or the error's
    type and first line).
    """
    group = mesh_for(degrees).expert_fsdp_mesh().get_group()
    begin = time.monotonic()
    if dist.get_rank() == stalling:
        time.sleep(stall_s)
        return {"elapsed": time.monotonic() - begin, "outcome": "stalled"}
    try:
        dist.all_reduce(torch.ones(1), group=group)
        outcome: Any = "completed"
    except Exception as exc:
        outcome = (type(exc).__name__, str(exc).splitlines()[0])
    return {"elapsed": time.monotonic() - begin, "outcome": outcome}


# ------------------------------------------------------------------------- process-group leak


def _resources() -> tuple[int, int]:
    """(groups in torch's registry, open file descriptors) of this process."""
    return len(dist.distributed_c10d._world.pg_map), len(os.listdir("/proc/self/fd"))


def device_mesh_calls(spec: TrainSpec, calls: int, applies: int) -> dict[str, Any]:
    """Pass a user's `DeviceMesh` (dp_shard x cp) to moetx again and again; count groups and fds.

    Each round calls `shard_sequence` and `gather_sequence` `calls` times and `Pass.apply`
    and `Pipeline.apply` (FSDP on a fresh model) `applies` times. Returns the counts before
    anything, after the first call of each kind, and at the end.
    """
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp_shard", "cp"))
    cp = ContextParallel()
    ids = torch.arange(4 * world).repeat(2, 1)
    out: dict[str, Any] = {"before": _resources()}

    def one_round() -> None:
        shard, _, _ = cp.shard_sequence(mesh, ids)
        cp.gather_sequence(mesh, shard.float(), dim=1)

    def one_apply() -> None:
        FSDP().apply(build_model(spec), mesh)
        (Pipeline() | FSDP()).apply(build_model(spec), mesh)

    one_round()
    one_apply()
    out["first"] = _resources()
    for _ in range(calls - 1):
        one_round()
    for _ in range(applies - 1):
        one_apply()
    out["last"] = _resources()
    return out


# ------------------------------------------------------------------------ context-parallel input


def cp_local_lengths_rows(comm: str, lengths: list[int], rows: int) -> dict[str, Any]:
    """A context-parallel model (cp = world size) fed `lengths[rank]` local tokens per row.

    Rank 0 feeds 2 rows, the others `rows` rows.
    Bypasses `shard_sequence`, as a user cutting batches by hand would. Returns `"ok"` and the
    loss, or the moetx error's type name and message.
    """
    from moetx.core.errors import MoetxError
    from moetx.models import MoETransformer
    from tests.bodies.context_parallel import CPCase

    mesh = mesh_for(MeshDegrees(cp=dist.get_world_size()))
    model = ContextParallel(comm=comm).apply(MoETransformer(CPCase().config()), mesh)
    n = lengths[dist.get_rank()]
    rows = 2 if dist.get_rank() == 0 else rows
    ids = torch.randint(0, 32, (rows, n), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(n).expand(rows, n)
    try:
        out = model(ids, labels=ids, position_ids=positions)
        out.loss.backward()
    except MoetxError as exc:
        return {"error": (type(exc).__name__, str(exc))}
    return {"ok": float(out.loss)}


# ------------------------------------------------------------------------------ checkpoints


def save_trained(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, path: str) -> bool:
    """One AdamW step on this rank's rows, then `save_checkpoint` of model and optimizer."""
    from moetx.training.checkpoint import save_checkpoint
    from tests.bodies.end_to_end import _step, make_optimizer

    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    opt = make_optimizer(model, spec.lr)
    data_ranks, data_rank = _data_rank(degrees)
    _step(model, opt, rank_batches(spec, 2 * data_ranks, data_ranks, data_rank)[0])
    save_checkpoint(path, model, opt)
    return True


def load_outcome(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, path: str) -> Any:
    """`load_checkpoint` into a fresh model and optimizer: `"loaded"`, or the error raised.

    Catches `BaseException`: torch's `CheckpointException` is not an `Exception`.
    """
    from moetx.training.checkpoint import load_checkpoint
    from tests.bodies.end_to_end import make_optimizer

    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    opt = make_optimizer(model, spec.lr)
    try:
        load_checkpoint(path, model, opt)
    except BaseException as exc:
        return (type(exc).__name__, str(exc))
    return "loaded"


def hyperparameters_round_trip(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, path: str
) -> dict[str, Any]:
    """Decay the lr with a scheduler and change the weight decay, save, load into a fresh AdamW.

    Returns each param group's `lr` and `weight_decay` as saved and as loaded.
    """
    from moetx.training.checkpoint import load_checkpoint, save_checkpoint
    from tests.bodies.end_to_end import _step, make_optimizer

    mesh = mesh_for(degrees)
    model = pipeline.apply(build_model(spec), mesh)
    opt = make_optimizer(model, spec.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    data_ranks, data_rank = _data_rank(degrees)
    for batch in rank_batches(spec, 2 * data_ranks, data_ranks, data_rank)[:2]:
        _step(model, opt, batch)
        scheduler.step()
    for group in opt.param_groups:
        group["weight_decay"] = 0.125
    saved = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
    save_checkpoint(path, model, opt)
    fresh = pipeline.apply(build_model(spec), mesh)
    fresh_opt = make_optimizer(fresh, spec.lr)
    load_checkpoint(path, fresh, fresh_opt)
    return {
        "saved": saved,
        "loaded": [(g["lr"], g["weight_decay"]) for g in fresh_opt.param_groups],
    }


def device_mesh_group_timeouts(dims: tuple[int, ...], names: tuple[str, ...]) -> dict[str, Any]:
    """Timeouts of the groups moetx creates when given a user's DeviceMesh (not the user's own).

    The user's mesh is made first; groups that appear while moetx converts it are its.
    """
    from moetx.mesh.parallel_mesh import ParallelMesh

    mesh = init_device_mesh("cpu", dims, mesh_dim_names=names)
    before = set(dist.distributed_c10d._world.pg_map)
    ParallelMesh.from_device_mesh(mesh, ep=2)
    new = [pg for pg in dist.distributed_c10d._world.pg_map if pg not in before]
    return {
        "world": _timeout_s(dist.group.WORLD),  # type: ignore[arg-type]
        "groups": {
            f"{pg.group_desc} {dist.get_process_group_ranks(pg)}": _timeout_s(pg) for pg in new
        },
    }
