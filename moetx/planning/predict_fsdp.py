"""FSDP2's units from shapes alone: their shards, which join the root, which stay gathered.

`FSDP.apply` makes one unit per routed-experts module (under `ExpertParallel`), per fp32 router
(with a low-precision `param_dtype`), per block (or per run of consecutive blocks, which
`min_unit_bytes` groups), for the untied embedding and lm head (unless `min_unit_bytes` joins
them to the root) and the root. `reshard_after_forward="auto"` keeps some
of them gathered from forward to backward by the rule of `moetx.passes.fsdp.reshard` (budget:
the rank's sharded parameters + gradients + AdamW state; root always, then backward order). This
module applies those rules to `ModelShapes`, so the planner needs no applied model; tests check
it against `plan` and real gloo ranks.
"""

from __future__ import annotations

import math

import attrs
import torch

from moetx.core.algebra import Pass, Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.planning.predict_state import (
    ROLES,
    ModelShapes,
    ParamInfo,
    find_pass,
    local_shape,
    uses_tp,
)

__all__ = ["FSDPUnit", "fsdp_resident", "fsdp_units"]

AUTO = "auto"
#: A parameter in a unit: its info, padded local numel, and bytes while gathered.
Member = tuple[ParamInfo, int, int]


@attrs.frozen
class FSDPUnit:
    """One FSDP2 unit: its parameters' padded local shapes on one rank and its mesh size."""

    name: str
    mesh_size: int
    numels: tuple[int, ...]  # padded local numel of each parameter (the all-gather input)
    trained: int  # padded local numel of the trained ones (the reduce-scatter output)
    itemsize: int  # all-gather dtype
    reduce_itemsize: int
    replicate: int = 1  # HSDP replicas: gradients all-reduced over them after the reduce-scatter
    root: bool = False
    #: Bytes its parameters take on a rank while gathered (unpadded, compute dtype, experts
    #: still split over ep): what "auto" weighs and what a kept unit holds after forward.
    gathered: int = 0
    kept: bool = False  # stays gathered from forward to backward (one all-gather per step)
    count: int = 1  # identical units (e.g. the same block repeated) described once

    @property
    def shard_bytes(self) -> int:
        """Bytes this rank contributes to the unit's all-gather."""
        return sum(self.numels) * self.itemsize


def _size(name: str | None, default: int) -> int:
    return torch.empty((), dtype=getattr(torch, name)).element_size() if name else default


def _fp32_roles(fsdp: Pass) -> set[str]:
    low = getattr(fsdp, "param_dtype", None) not in (None, "float32")
    return set(getattr(fsdp, "fp32_modules", ())) if low else set()


def _gathered(
    p: ParamInfo, d: MeshDegrees, ep: bool, fsdp: Pass, fp32: set[str], tp: bool = False
) -> int:
    """`moetx.passes.fsdp.reshard.gathered_bytes` for one parameter."""
    split = d.ep if p.role == "expert" and ep else d.tp if tp and p.tp_dim is not None else 1
    numel = math.prod(p.shape) // split
    return numel * (4 if p.role in fp32 else _size(getattr(fsdp, "param_dtype", None), p.itemsize))


def _joined(shapes: ModelShapes, d: MeshDegrees, ep: bool, fsdp: Pass) -> set[str]:
    """The roles (`embedding`, `lm_head`) `min_unit_bytes` joins to the root unit
    (`moetx.passes.fsdp.reshard.joining_root`)."""
    limit = getattr(fsdp, "min_unit_bytes", 0)
    if not limit or not getattr(fsdp, "wrap_root", True) or shapes.tied_embeddings:
        return set()
    fp32 = _fp32_roles(fsdp)
    param_dtype = getattr(fsdp, "param_dtype", None)
    apart = "lm_head" in fp32 or getattr(fsdp, "output_dtype", None) not in (None, param_dtype)
    sizes: dict[str, int] = {}
    for p, count in shapes.grouped:
        if p.role in ("embedding", "lm_head"):
            sizes[p.role] = sizes.get(p.role, 0) + count * _gathered(p, d, ep, fsdp, fp32)
    return {r for r, n in sizes.items() if n < limit and not (r == "lm_head" and apart)}


def _budget(shapes: ModelShapes, d: MeshDegrees, ep: bool, tp: bool) -> int:
    """The rank's sharded parameters + gradients + AdamW bytes, as "auto" counts them."""
    total = 0
    for p, count in shapes.grouped:
        expert = p.role == "expert" and ep
        split = d.ep if expert else d.tp if tp and p.tp_dim is not None else 1
        numel = math.prod(p.shape) // split
        shards = d.dp_replicate * d.ep_shard if expert else d.dp_shard_cp
        total += count * -(-numel // shards) * p.itemsize * (4 if p.trainable else 1)
    return total


def _block_groups(members: dict[tuple[str, int], list[Member]], fsdp: Pass) -> dict[int, int]:
    """Block -> the first block of its unit (`moetx.passes.fsdp.reshard.block_groups`): a unit
    takes the next block while its dense bytes are under `min_unit_bytes`; a block whose
    parameters' itemsizes differ from the unit's first starts a new one."""
    limit = getattr(fsdp, "min_unit_bytes", 0)
    first: dict[int, int] = {}
    start, total, kinds = -1, 0, frozenset[int]()
    for (role, block), group in sorted(members.items(), key=lambda kv: kv[0][1]):
        if role != "block":
            continue
        here = frozenset(p.itemsize for p, _, _ in group)
        if start < 0 or limit <= 0 or total >= limit or here != kinds:
            start, total, kinds = block, 0, here
        first[block] = start
        total += sum(g for _, _, g in group)
    return first


def _backward_rank(key: tuple[str, int], blocks: int) -> tuple[int, int]:
    role, block = key
    if role == "root":
        return (0, 0)
    if role == "lm_head":
        return (1, 0)
    if role == "embedding":
        return (2 + blocks, 0)
    return (2 + blocks - 1 - block, ("expert", "router", "block").index(role))


def fsdp_units(shapes: ModelShapes, degrees: MeshDegrees, pipeline: Pipeline) -> list[FSDPUnit]:
    """The FSDP2 units `FSDP.apply` makes, innermost first (empty without `FSDP`)."""
    fsdp = find_pass(pipeline, "fsdp")
    if fsdp is None:
        return []
    ep = find_pass(pipeline, "ep") is not None and degrees.ep > 1
    tp = uses_tp(pipeline, degrees)
    key = ("fsdp_units", degrees, fsdp, ep, tp)
    if key not in shapes.cache:
        shapes.cache[key] = _units(shapes, degrees, fsdp, ep, tp)
    return list(shapes.cache[key])  # type: ignore[call-overload]


def _units(
    shapes: ModelShapes, degrees: MeshDegrees, fsdp: Pass, ep: bool, tp: bool
) -> list[FSDPUnit]:
    param_dtype = getattr(fsdp, "param_dtype", None)
    reduce_dtype = getattr(fsdp, "reduce_dtype", None)
    fp32_roles = _fp32_roles(fsdp)
    joined = set() if tp else _joined(shapes, degrees, ep, fsdp)

    members: dict[tuple[str, int], list[Member]] = {}
    for p in shapes.params:
        _, numel = local_shape(p, degrees, ep, True, tp)
        role, block = p.role, p.block
        if role == "expert" and not ep:
            role = "block"
        if role == "router" and "router" not in fp32_roles:
            role = "block"
        if role in joined:
            role, block = "root", -1
        gathered = _gathered(p, degrees, ep, fsdp, fp32_roles, tp)
        members.setdefault((role, block), []).append((p, numel, gathered))
    first = _block_groups(members, fsdp)  # consecutive small blocks share one unit
    last = {f: b for b, f in first.items()}  # ... which backward reaches at its last block
    for block, start in first.items():
        if start != block:
            members[("block", start)] += members.pop(("block", block))

    kept: set[tuple[str, int]] = set()
    raf = getattr(fsdp, "reshard_after_forward", True)
    if raf == AUTO:
        budget, total = _budget(shapes, degrees, ep, tp), 0

        def rank(k: tuple[str, int]) -> tuple[int, int]:
            return _backward_rank((k[0], last[k[1]]) if k[0] == "block" else k, shapes.num_blocks)

        for key in sorted(members, key=rank):
            size = sum(g for _, _, g in members[key])
            if key[0] == "root" or total + size <= budget:
                total += size
                kept.add(key)

    out: dict[tuple[object, ...], FSDPUnit] = {}
    for key, group in sorted(members.items(), key=lambda kv: ROLES.index(kv[0][0])):
        role = key[0]
        fp32 = role in fp32_roles
        itemsize = 4 if fp32 else _size(param_dtype, group[0][0].itemsize)
        expert = role == "expert"
        unit = FSDPUnit(
            name=role,
            mesh_size=degrees.dp_replicate * degrees.ep_shard if expert else degrees.dp_shard_cp,
            numels=tuple(n for _, n, _ in group),
            trained=sum(n for p, n, _ in group if p.trainable),
            itemsize=itemsize,
            reduce_itemsize=4 if fp32 else _size(reduce_dtype, itemsize),
            replicate=1 if expert else degrees.dp_replicate,
            root=role == "root",
            gathered=sum(g for _, _, g in group),
            kept=key in kept,
        )
        k = attrs.astuple(unit, recurse=False)
        if k in out:
            unit = attrs.evolve(out[k], count=out[k].count + 1)
        out[k] = unit
    return list(out.values())


def fsdp_resident(shapes: ModelShapes, d: MeshDegrees, pipeline: Pipeline) -> int:
    """What FSDP2 keeps gathered after forward (the rule `plan` checks against real ranks)."""
    fsdp = find_pass(pipeline, "fsdp")
    raf = getattr(fsdp, "reshard_after_forward", True)
    if fsdp is None or raf is True:
        return 0
    if raf is False or raf == AUTO:  # a kept unit holds every rank's padded shard
        units = fsdp_units(shapes, d, pipeline)
        return sum(u.mesh_size * u.shard_bytes * u.count for u in units if u.kept or raf is False)
    ep = find_pass(pipeline, "ep") is not None and d.ep > 1
    tp = uses_tp(pipeline, d)
    fp32 = _fp32_roles(fsdp)
    total = 0
    for p, count in shapes.grouped:
        expert = p.role == "expert" and ep
        gathered = count * _gathered(p, d, ep, fsdp, fp32, tp)
        # FSDP2's int: after forward, keep a copy resharded over groups of that size (1/raf per
        # rank); equal to the unit's shard-group size it is True, 1 is False.
        group = d.dp_replicate * d.ep_shard if expert else d.dp_shard_cp
        if raf != group:
            total += gathered // int(raf)
    return total
