"""`plan`: what a pipeline would do to a model, per parameter group and per rank, without training.

The plan is not a model of the passes: it *runs* them. The model is built (or copied) on the
`meta` device, the pipeline is applied for real, under torch's fake process-group backend when
no process group exists (no collective runs; TORCH-CPU-NOTES §5), and the resulting DTensor
meshes and placements are read off the parameters. Every rank's local shapes then follow from
those placements and the rank's mesh coordinates (DTensor's own chunking rule); on the rank
that applied the pipeline they are checked against the real local tensors. A DeepSeek-V3-shaped
model (685B parameters) at world size 256 plans in a few seconds.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import re
import time
import typing
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from moetx.core import seams
from moetx.core.algebra import Pass, Pipeline
from moetx.core.errors import MeshError
from moetx.core.record import applied_passes, find_applied
from moetx.mesh.parallel_mesh import MeshDegrees, ParallelMesh, as_parallel_mesh
from moetx.models import MoEConfig, MoETransformer
from moetx.passes.fsdp.describe import describe_units
from moetx.passes.fsdp.reshard import AUTO, gathered_bytes
from moetx.planning.fake_world import fake_world
from moetx.planning.report import ParamGroup, Plan, RankBytes, human_bytes

__all__ = ["ParamGroup", "Plan", "RankBytes", "plan"]

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def plan(
    pipeline: Pipeline | Pass,
    model: nn.Module | MoEConfig,
    mesh: MeshDegrees | ParallelMesh | DeviceMesh,
    *,
    rank: int = 0,
) -> Plan:
    """Apply `pipeline` to a `meta` copy of `model` and report placements and per-rank bytes.

    `model` is never changed (a `meta` copy is planned; a `MoEConfig` is built on `meta`). No
    collective runs.

    Args:
        pipeline: The pipeline (or single pass) to plan.
        model: A module (any device; only shapes, dtypes and structure are used) or a
            `moetx.models.MoEConfig`.
        mesh: `MeshDegrees` (no process group needed: a fake one is opened for the call and
            destroyed after it; inside an initialised process group the degrees must match its
            world size and, as with `ParallelMesh.build`, every rank must call `plan`), or a
            `ParallelMesh` / named `DeviceMesh` of the current process group.
        rank: The rank whose local shapes the table shows.

    Returns:
        A `Plan`.

    Raises:
        MeshError: `rank` is outside the world, or the degrees do not match the initialised
            process group.
        MoetxError: Whatever the pipeline's own checks raise for this model and mesh.
    """
    start = time.perf_counter()
    if isinstance(pipeline, Pass):
        pipeline = Pipeline() | pipeline
    degrees = mesh if isinstance(mesh, MeshDegrees) else as_parallel_mesh(mesh).degrees
    if not 0 <= rank < degrees.world_size:
        raise MeshError(f"`rank` ({rank}) must be in [0, {degrees.world_size}).")
    meta = _meta_model(model)
    name = type(meta).__name__  # before FSDP2 swaps the class
    with _planning_mesh(mesh) as pmesh:
        planned = pipeline.apply(meta, pmesh)
        groups, ranks, resident = _analyse(planned, pmesh, rank)
        notes = _notes(planned, resident)
    warnings = _warnings(pipeline, resident)
    return Plan(
        pipeline=pipeline,
        degrees=degrees,
        rank=rank,
        model=name,
        num_parameters=sum(p.numel() for p in planned.parameters()),
        groups=groups,
        ranks=ranks,
        resident_after_forward=resident[0],
        resident_experts_after_forward=resident[1],
        warnings=warnings,
        notes=notes,
        seconds=time.perf_counter() - start,
    )


# ------------------------------------------------------------------------------ model and mesh


def _meta_model(model: nn.Module | MoEConfig) -> nn.Module:

    if isinstance(model, MoEConfig):
        with torch.device("meta"):
            return MoETransformer(model)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be an `nn.Module` or a `moetx.models.MoEConfig` (got "
            f"`{type(model).__name__}`)."
        )
    # A deep copy whose tensors are pre-seeded in the memo with meta twins: nothing is
    # allocated, tied parameters stay tied, and the user's model is untouched.
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _planning_mesh(mesh: MeshDegrees | ParallelMesh | DeviceMesh) -> Iterator[ParallelMesh]:
    """The mesh to apply on: the caller's, or one built from degrees (in a fake world if need be)."""
    if not isinstance(mesh, MeshDegrees):
        yield as_parallel_mesh(mesh)
        return
    d = mesh
    if dist.is_initialized():
        world = dist.get_world_size()
        if world != d.world_size:
            raise MeshError(
                f"The degrees' world size ({d.world_size}) must equal the initialised process "
                f"group's ({world}) to plan inside it.\n"
                "  fix: plan outside any process group (a fake one is used), or pass the "
                "`ParallelMesh` you train with."
            )
        yield ParallelMesh.build(
            dp_replicate=d.dp_replicate, dp_shard=d.dp_shard, cp=d.cp, ep=d.ep, tp=d.tp
        )
        return

    with fake_world(d.world_size, 0):
        yield ParallelMesh.build(
            dp_replicate=d.dp_replicate,
            dp_shard=d.dp_shard,
            cp=d.cp,
            ep=d.ep,
            tp=d.tp,
            device_type="cpu",
        )


# ------------------------------------------------------------------------------------- analysis


def _handlers(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """FQN -> stages of the applied passes that handle that parameter."""
    names = [n for n, _ in model.named_parameters()]
    out: dict[str, list[str]] = {n: [] for n in names}
    for entry in applied_passes(model):
        stage = entry.pass_.placement.stage
        facts = entry.facts
        if stage == "ep":
            chosen = set(facts.get("expert_params", ()))
        elif stage in ("ac", "compile"):  # both record the blocks they wrap
            chosen = {
                n for n in names if n.startswith(tuple(f"{b}." for b in facts.get("blocks", ())))
            }
        elif stage == "cp":
            attn = tuple(f"{c.rsplit('.', 1)[0]}." for c in facts.get("attention_cores", ()))
            chosen = {n for n in names if attn and n.startswith(attn)}
        elif stage == "fsdp":
            chosen = set(names)
        else:
            chosen = set(facts.get("params", ()))
        for n in chosen & out.keys():
            out[n].append(stage)
    return {n: tuple(s) for n, s in out.items()}


def _coordinates(mesh: DeviceMesh) -> dict[int, tuple[int, ...]]:
    """Rank -> its coordinate in *its* slice of `mesh` (every slice of the same layout)."""
    # Private: the layout of all the mesh's slices, as DeviceMesh uses it to create their groups.
    full = mesh._layout.remap_to_tensor(mesh._rank_map)
    coords: dict[int, tuple[int, ...]] = {}
    for index in itertools.product(*(range(s) for s in full.shape)):
        coords[int(full[index])] = tuple(index[1:])
    return coords


def _even_shape(p: DTensor) -> tuple[int, ...] | None:
    """The local shape if every sharded dim splits evenly (then all ranks agree), else None."""
    shape = list(p.shape)
    divisors = [1] * len(shape)
    for size, placement in zip(p.device_mesh.shape, p.placements, strict=True):
        dim = getattr(placement, "dim", None)  # Shard and _StridedShard; Replicate/Partial: None
        if dim is not None:
            divisors[dim] *= size
    if any(s % d for s, d in zip(shape, divisors, strict=True)):
        return None
    return tuple(s // d for s, d in zip(shape, divisors, strict=True))


def _local_shape(p: torch.Tensor, coord: tuple[int, ...] | None) -> tuple[int, ...]:
    if not isinstance(p, DTensor):
        return tuple(p.shape)
    if coord is None:  # this rank is outside the mesh: it holds nothing of p
        return (0,)
    even = _even_shape(p)
    if even is not None:
        return even
    # Uneven: DTensor's own chunking rule for this coordinate (slow for _StridedShard).
    shape, _ = _compute_local_shape_and_global_offset(
        p.shape, p.device_mesh.shape, list(coord), p.placements, skip_offset=True
    )
    return tuple(shape)


def _analyse(
    model: nn.Module, mesh: ParallelMesh, rank: int
) -> tuple[tuple[ParamGroup, ...], tuple[RankBytes, ...], tuple[int, int]]:
    world = mesh.world_size
    handlers = _handlers(model)
    coords: dict[int, dict[int, tuple[int, ...]]] = {}  # id(mesh) -> rank -> coordinate
    here = dist.get_rank()
    grouped: dict[tuple[Any, ...], list[tuple[str, torch.Tensor]]] = {}
    for fqn, param in model.named_parameters():
        key = (_INDEX.sub("*", fqn), handlers[fqn], *_layout(param))
        grouped.setdefault(key, []).append((fqn, param))

    groups: list[ParamGroup] = []
    totals = [RankBytes(0, 0, 0)] * world
    for key, members in grouped.items():
        name, p = members[0]
        mesh_ranks: dict[int, tuple[int, ...]] = {}
        if isinstance(p, DTensor):
            dm = p.device_mesh  # alive for the whole loop, so its id is a safe key
            if id(dm) not in coords:
                coords[id(dm)] = _coordinates(dm)
            mesh_ranks = coords[id(dm)]
            for _, q in members:  # the analytic shape must be what this rank really holds
                real = tuple(typing.cast(DTensor, q).to_local().shape)
                mine = _local_shape(q, mesh_ranks.get(here))
                assert real == mine, f"plan: {name}: local shape {real} != computed {mine}"
        per_rank: dict[tuple[int, ...], RankBytes] = {}
        for r in range(world):
            shape = _local_shape(p, mesh_ranks.get(r))
            if shape not in per_rank:
                per_rank[shape] = _bytes(shape, p, len(members))
            totals[r] = totals[r] + per_rank[shape]
        local = _local_shape(p, mesh_ranks.get(rank))
        groups.append(
            ParamGroup(
                pattern=key[0],
                count=len(members),
                passes=key[1],
                mesh_axes=key[2],
                mesh_shape=key[3],
                placements=key[4],
                global_shape=tuple(p.shape),
                local_shape=local,
                dtype=str(p.dtype).removeprefix("torch."),
                requires_grad=p.requires_grad,
                bytes=per_rank[local],
            )
        )
    return tuple(groups), tuple(totals), _resident(model, mesh)


def _layout(p: torch.Tensor) -> tuple[Any, ...]:
    if isinstance(p, DTensor):
        dm = p.device_mesh
        axes, shape, places = (
            tuple(dm.mesh_dim_names or ()),
            tuple(dm.shape),
            tuple(map(repr, p.placements)),
        )
    else:
        axes, shape, places = (), (), ()
    return axes, shape, places, tuple(p.shape), p.dtype, p.requires_grad


def _bytes(shape: tuple[int, ...], p: torch.Tensor, count: int) -> RankBytes:
    n = count * _numel(shape) * p.element_size()
    trained = n if p.requires_grad else 0
    return RankBytes(params=n, grads=trained, optimizer=2 * trained)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _resident(model: nn.Module, mesh: ParallelMesh) -> tuple[int, int]:
    """(all, experts): bytes per rank FSDP keeps gathered from forward to backward."""

    record = applied_passes(model)
    entry = find_applied(record, "fsdp")
    if entry is None:
        return 0, 0
    fsdp = entry.pass_
    raf = fsdp.reshard_after_forward  # type: ignore[attr-defined]
    if raf is True:
        return 0, 0
    resident = entry.facts.get("resident")
    kept_params = set(resident.resident_params) if resident is not None else set()
    sizes = {True: mesh.expert_fsdp_mesh().size(), False: mesh.degrees.dp_shard_cp}
    padded = _padded_numels(model)
    total = expert_total = 0
    for name, (numel, gathered, expert) in gathered_bytes(model, fsdp, record).items():
        # A kept parameter holds FSDP2's all-gather output: every rank's padded shard.
        whole = padded.get(name, numel) * (gathered // numel if numel else 0)
        # FSDP2's int: after forward, keep a copy resharded over groups of that size (1/raf per
        # rank); equal to the unit's shard-group size it is True, 1 is False. "auto": the
        # units `choose_resident` kept are False, the others True.
        if raf == AUTO:
            kept = whole if name in kept_params else 0
        elif raf is False or raf == 1:
            kept = whole
        else:
            kept = 0 if raf == sizes[expert] else gathered // int(raf)
        total += kept
        if expert:
            expert_total += kept
    return total, expert_total


def _padded_numels(model: nn.Module) -> dict[str, int]:
    """Parameter FQN -> elements of its FSDP2 all-gather output (shards padded to equal size)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, int] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        # Private FSDP2 state: the padded shard size is not public.
        group = module._get_fsdp_state()._fsdp_param_group  # type: ignore[attr-defined]
        for fp in group.fsdp_params if group is not None else ():
            name = names.get(id(fp.sharded_param))
            if name is not None:
                out[name] = fp.padded_sharded_param_size.numel() * fp.mesh_info.shard_mesh_size
    return out


def _notes(planned: nn.Module, resident: tuple[int, int]) -> tuple[str, ...]:
    entry = find_applied(applied_passes(planned), "fsdp")
    choice = entry.facts.get("resident") if entry is not None else None
    units = describe_units(planned)
    if choice is None:
        return (units,) if units else ()
    n = len(choice.kept_units) + len(choice.resharded_units)
    return (
        *((units,) if units else ()),
        f"`reshard_after_forward='auto'` keeps {len(choice.kept_units)} of {n} FSDP units "
        f"gathered from forward to backward (one all-gather per step each): "
        f"+{human_bytes(resident[0])} per rank at peak, of which routed experts "
        f"+{human_bytes(resident[1])} (budget: the rank's sharded params + grads + AdamW, "
        f"{human_bytes(choice.budget)}).",
    )


def _warnings(pipeline: Pipeline, resident: tuple[int, int]) -> tuple[str, ...]:

    if not resident[0]:
        return ()
    fsdp = next(p for p in pipeline if p.placement.stage == "fsdp")
    raf = fsdp.reshard_after_forward  # type: ignore[attr-defined]
    if raf == AUTO:  # within its budget by construction: a note, not a warning
        return ()
    what = (
        "keeps every unit's gathered parameters"
        if raf is False
        else f"keeps a copy of the gathered parameters sharded over {raf} ranks"
    )
    return (
        f"`FSDP(reshard_after_forward={raf!r})` {what} resident from forward to backward: "
        f"+{human_bytes(resident[0])} per rank at peak, of which routed experts "
        f"+{human_bytes(resident[1])} (Automodel#2577: OOM at cp=2/ep=4).",
    )


seams.install_planner(plan)
