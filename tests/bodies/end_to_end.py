"""Rank bodies for the end-to-end tests: checkpoints, clipping, accumulation, robustness.

Data layout shared with the parent's references: a run over `global_rows` rows per step draws
`global_batches(evolve(spec, rows_per_rank=global_rows), 1)`, the same rows whatever the world
size, and data rank r trains on its contiguous `global_rows / data ranks` of them.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from moetx.core.algebra import Pipeline
from moetx.core.record import applied_passes, check_not_failed
from moetx.mesh.parallel_mesh import MeshDegrees, ParallelMesh
from moetx.models import MoETransformer
from moetx.structure.discovery import discover
from moetx.testing.parity import clean_fqn, gradients, parameters, snapshot
from moetx.testing.ranks import cached
from moetx.testing.train import TrainSpec, build_model, global_batches, mesh_for
from moetx.training.accumulate import no_sync
from moetx.training.checkpoint import full_state_dict, load_checkpoint, save_checkpoint
from moetx.training.clip import clip_grad_norm_
from moetx.training.grad_sync import sync_gradients

Batch = tuple[torch.Tensor, torch.Tensor]

# ------------------------------------------------------------------------------------ data


def step_batches(spec: TrainSpec, global_rows: int) -> list[Batch]:
    """The `spec.steps` global batches of `global_rows` rows (independent of the world size)."""
    return global_batches(attrs.evolve(spec, rows_per_rank=global_rows), 1)


def rank_batches(spec: TrainSpec, global_rows: int, data_ranks: int, data_rank: int) -> list[Batch]:
    """This data rank's contiguous share of every global batch."""
    n = global_rows // data_ranks
    rows = slice(data_rank * n, (data_rank + 1) * n)
    return [(ids[rows], labels[rows]) for ids, labels in step_batches(spec, global_rows)]


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW as `moetx.testing.train.train` makes it."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Full optimizer state keyed by FQN: rank 0 gets it (a copy), other ranks `{}`.

    A deep copy: `get_optimizer_state_dict(full_state_dict=True, cpu_offload=True)` aliases the
    live state on CPU, so a later `step()` would change it (TORCH-CPU-NOTES §3.7). Without a
    process group the same dict is built from the plain optimizer.
    """
    if dist.is_initialized():
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))
    names = {id(p): clean_fqn(n) for n, p in model.named_parameters()}
    state = {names[id(p)]: copy.deepcopy(s) for p, s in opt.state.items()}
    groups = [
        {
            **{k: v for k, v in g.items() if k != "params"},
            "params": [names[id(p)] for p in g["params"]],
        }
        for g in opt.param_groups
    ]
    return {"state": state, "param_groups": groups}


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch) -> torch.Tensor:
    ids, labels = batch
    loss = model(ids, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach().clone()


def _data_rank(degrees: MeshDegrees) -> tuple[int, int]:
    mesh = mesh_for(degrees)
    return mesh.data_size, mesh.data_rank


# ------------------------------------------------------------------------------ checkpoints


def train_save_continue(
    spec: TrainSpec,
    pipeline: Pipeline,
    degrees: MeshDegrees,
    path: str,
    *,
    save_after: int,
    global_rows: int,
) -> dict[str, Any]:
    """Train `spec.steps` steps, saving model + AdamW after `save_after` of them.

    Returns every step's loss (the uninterrupted run), and the full parameters, full
    optimizer state (rank 0) and `full_state_dict` (rank 0) as they were when saved.
    """
    data_ranks, data_rank = _data_rank(degrees)
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    opt = make_optimizer(model, spec.lr)
    losses: list[torch.Tensor] = []
    saved: dict[str, Any] = {}
    for step, batch in enumerate(rank_batches(spec, global_rows, data_ranks, data_rank)):
        if step == save_after:
            save_checkpoint(path, model, opt)
            saved = {
                "params": parameters(model),
                "optim": optimizer_state(model, opt),
                "full": full_state_dict(model),
            }
        losses.append(_step(model, opt, batch))
    return {"losses": losses, **saved}


def load_and_continue(
    spec: TrainSpec,
    pipeline: Pipeline,
    degrees: MeshDegrees | None,
    path: str,
    *,
    start: int,
    global_rows: int,
    meta: bool = False,
) -> dict[str, Any]:
    """Build a fresh model and optimizer (`degrees=None`: plain, no process group), load, train.

    The fresh model is initialised with another seed (or left uninitialised on `meta`), so
    only the load can make it right. Returns the parameters and optimizer state right after
    loading and the losses of steps `start, start + 1, ...`.
    """
    if degrees is None:
        data_ranks, data_rank = 1, 0
        model = build_model(attrs.evolve(spec, seed=spec.seed + 100))
    else:
        data_ranks, data_rank = _data_rank(degrees)
        fresh = build_model(attrs.evolve(spec, seed=spec.seed + 100), meta=meta)
        model = pipeline.apply(fresh, mesh_for(degrees))
        if meta:
            model.to_empty(device="cpu")
    opt = make_optimizer(model, spec.lr)
    load_checkpoint(path, model, opt)
    result: dict[str, Any] = {"params": parameters(model), "optim": optimizer_state(model, opt)}
    batches = rank_batches(spec, global_rows, data_ranks, data_rank)[start:]
    result["losses"] = [_step(model, opt, batch) for batch in batches]
    return result


def meta_load(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, path: str
) -> dict[str, Any]:
    """Build on meta, apply `pipeline`, `to_empty`, load the checkpoint instead of an init.

    Returns the loaded parameters (gathered), whether every parameter and buffer was still on
    meta after `apply` (nothing was allocated before `to_empty`), and this rank's local
    parameter bytes after `to_empty`.
    """
    with torch.device("meta"):
        model: nn.Module = MoETransformer(spec.config)
    model = pipeline.apply(model, mesh_for(degrees))
    tensors = [*model.parameters(), *model.buffers()]
    all_meta = all(
        (t.to_local() if isinstance(t, DTensor) else t).device.type == "meta" for t in tensors
    )
    model.to_empty(device="cpu")
    local_bytes = sum(
        (p.to_local() if isinstance(p, DTensor) else p).untyped_storage().nbytes()
        for p in model.parameters()
    )
    load_checkpoint(path, model)
    return {"params": parameters(model), "all_meta": all_meta, "local_bytes": local_bytes}


def exported_state(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """`full_state_dict` under both modes, and the model's `state_dict` keys (cleaned).

    After exporting, every local parameter is changed in place (+1), so an export that
    aliased the live model would show it.
    """
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    rank0 = full_state_dict(model)
    everyone = full_state_dict(model, rank0_only=False)
    with torch.no_grad():
        for p in model.parameters():
            (p.to_local() if isinstance(p, DTensor) else p).add_(1.0)
    return {
        "rank0": rank0,
        "everyone": everyone,
        "keys": [clean_fqn(k) for k in model.state_dict()],
    }


# ------------------------------------------------------------------------------- clipping


def clipped_gradients(
    spec: TrainSpec,
    pipeline: Pipeline,
    degrees: MeshDegrees,
    max_norm: float,
    norm_type: float,
    *,
    global_rows: int,
    torch_clip: bool = False,
) -> dict[str, Any]:
    """One forward/backward on this rank's rows, then `clip_grad_norm_`.

    Returns the norm and the gathered gradients after clipping. With `torch_clip`, calls
    `torch.nn.utils.clip_grad_norm_` instead and returns what it did: its norm, or the
    exception's type and message.
    """
    mesh = mesh_for(degrees)
    data_ranks, data_rank = _data_rank(degrees)
    model = pipeline.apply(build_model(spec), mesh)
    ids, labels = rank_batches(spec, global_rows, data_ranks, data_rank)[0]
    model(ids, labels=labels).loss.backward()
    if not _has_fsdp(model) and mesh.degree("ep") > 1:
        sync_gradients(model, mesh)
    if torch_clip:
        try:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)
        except Exception as exc:
            return {"error": (type(exc).__name__, str(exc).splitlines()[0])}
        return {"norm": norm.full_tensor() if isinstance(norm, DTensor) else norm.detach()}
    norm = clip_grad_norm_(model, max_norm, norm_type)
    return {"norm": norm, "grads": gradients(model)}


def _has_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


# ---------------------------------------------------------------------------- accumulation


class _ReductionCounter(TorchDispatchMode):
    """Counts gradient-reduction collectives (c10d reduce-scatter / all-reduce ops) it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace in ("c10d", "_c10d_functional") and "reduce" in func.__name__:
            self.count += 1
        return func(*args, **(kwargs or {}))


def accumulate_train(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, *, micro: int
) -> dict[str, Any]:
    """`spec.steps` AdamW steps, each over `micro` micro-batches of `spec.rows_per_rank` rows.

    Gradients are reduced only on the last micro-batch (`no_sync`); each micro-batch loss is
    scaled by 1/micro. Returns per-step losses (sum of the scaled micro-batch losses), full
    gradients of every step, final parameters (as `moetx.testing.train.train`), and per step
    the number of reduction collectives each micro-batch's backward ran.
    """
    data_ranks, data_rank = _data_rank(degrees)
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    opt = make_optimizer(model, spec.lr)
    rows = spec.rows_per_rank
    losses, grads, reductions = [], [], []
    for ids, labels in rank_batches(spec, data_ranks * micro * rows, data_ranks, data_rank):
        total = torch.zeros(())
        counts = []
        for i in range(micro):
            part = slice(i * rows, (i + 1) * rows)
            with no_sync(model, enabled=i < micro - 1):
                loss = model(ids[part], labels=labels[part]).loss / micro
                with _ReductionCounter() as counter:
                    loss.backward()
            counts.append(counter.count)
            total += loss.detach()
        losses.append(total)
        reductions.append(counts)
        grads.append(gradients(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"losses": losses, "grads": grads, "params": parameters(model), "reductions": reductions}


# ------------------------------------------------------------------------------ robustness


def group_timeouts(degrees: MeshDegrees) -> dict[str, float]:
    """Seconds of the gloo timeout of the world group and of every axis's group."""
    mesh = mesh_for(degrees)

    def seconds(group: dist.ProcessGroup) -> float:
        backend = group._get_backend(torch.device("cpu"))
        return float(backend.options._timeout.total_seconds())  # type: ignore[attr-defined]

    out = {"world": seconds(dist.group.WORLD)}  # type: ignore[arg-type]
    for axis in ("dp_replicate", "dp_shard", "cp", "ep", "ep_shard", "dp_shard_cp"):
        out[axis] = seconds(mesh[axis].get_group())
    return out


def rank_number() -> int:
    """This rank's number (a trivial body: is the pool alive?)."""
    return dist.get_rank()


class InjectedFault(RuntimeError):
    """Raised on purpose by `fail_mid_step`."""


def fail_mid_step(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, failing: int) -> float:
    """Train one step; rank `failing` raises right after the first MoE layer's all-to-alls.

    The other ranks go on into their next collective and wait there until the pool kills
    them. The exception's message ends with the time it was raised (`time.time()`), so the
    parent can measure how long the failure took to reach it.
    """
    data_ranks, data_rank = _data_rank(degrees)
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    experts = discover(model).moe_layers()[0].experts

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if dist.get_rank() == failing:
            raise InjectedFault(f"injected fault on rank {failing} at {time.time():.3f}")

    experts.register_forward_hook(hook)
    ids, labels = rank_batches(spec, data_ranks * spec.rows_per_rank, data_ranks, data_rank)[0]
    model(ids, labels=labels).loss.backward()
    return time.time()


def fail_in_apply(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, failing: int) -> int:
    """Apply `pipeline`; on rank `failing` the model has 3 experts, so EP's check raises there."""
    if dist.get_rank() == failing:
        spec = attrs.evolve(spec, config=attrs.evolve(spec.config, num_experts=3, top_k=1))
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    return len(applied_passes(model))


BAD_INPUTS = (
    "ExpertDivisibilityError",
    "NoMoELayersError",
    "MeshAxisError",
    "PassAlreadyAppliedError",
    "PipelineOrderError",
)
"""The README's apply-time errors that `bad_input` provokes, one case each."""


def _snapshot(model: nn.Module) -> dict[str, Any]:
    def local(p: torch.Tensor) -> torch.Tensor:
        return (p.to_local() if isinstance(p, DTensor) else p).detach().clone()

    return {
        "params": {n: (id(p), local(p)) for n, p in model.named_parameters()},
        "classes": {n: type(m) for n, m in model.named_modules()},
        "record": applied_passes(model),
        "snapshot": snapshot(model),
    }


def _untouched(model: nn.Module, before: dict[str, Any]) -> dict[str, bool]:
    after = _snapshot(model)
    same_values = after["params"].keys() == before["params"].keys() and all(
        after["params"][n][0] == ident and torch.equal(after["params"][n][1], value)
        for n, (ident, value) in before["params"].items()
    )
    try:
        check_not_failed(model)
        not_failed = True
    except Exception:
        not_failed = False
    return {
        "same_params": same_values,
        "same_classes": after["classes"] == before["classes"],
        "same_record": after["record"] == before["record"],
        "not_marked_failed": not_failed,
        "changes": before["snapshot"].changes(model),
    }


def bad_input(spec: TrainSpec, degrees: MeshDegrees, case: str) -> dict[str, Any]:
    """Provoke the apply-time error `case` on a real mesh; report it and the model's state.

    Returns the error's type name and first line, and whether the model was left exactly as
    before the failing call (same parameter objects and values, classes, record, not marked
    as half-applied).
    """
    from torch.distributed.device_mesh import init_device_mesh

    from moetx.passes import FSDP, ExpertParallel

    mesh: ParallelMesh = mesh_for(degrees)
    pipeline = ExpertParallel() | FSDP()
    config = spec.config
    if case == "ExpertDivisibilityError":
        config = attrs.evolve(config, num_experts=3, top_k=1)
    elif case == "NoMoELayersError":
        config = attrs.evolve(config, num_dense_layers=config.num_layers, num_mtp_layers=0)
    elif case == "MeshAxisError":
        world = dist.get_world_size()
        mesh = cached(  # a user's DeviceMesh without an `ep` axis
            ("end_to_end.dp_shard_only", world),
            lambda: ParallelMesh.from_device_mesh(
                init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
            ),
        )
    model = build_model(attrs.evolve(spec, config=config))
    if case == "PassAlreadyAppliedError":
        model = pipeline.apply(model, mesh)
        pipeline = Pipeline() | FSDP()
    elif case == "PipelineOrderError":  # one by one: FSDP first, then EP
        model = FSDP().apply(model, mesh)
        pipeline = Pipeline() | ExpertParallel()
    before = _snapshot(model)
    try:
        pipeline.apply(model, mesh)
    except Exception as exc:
        error = (type(exc).__name__, str(exc).splitlines()[0])
    else:
        error = ("no error", "")
    return {"error": error, **_untouched(model, before)}
