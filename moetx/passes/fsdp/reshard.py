"""`FSDP(reshard_after_forward="auto")`: which units stay gathered from forward to backward.

A unit kept gathered after forward (FSDP2's `reshard_after_forward=False`) is all-gathered once
per step instead of twice, at the cost of its gathered parameters staying resident until its
backward. The rule, decided from the model and the mesh alone (so `plan` shows it):

- the root unit is always kept (backward starts with it; FSDP2's own default for the root);
- the other units are taken in backward order (lm head, final norm, the blocks from the last
  to the first, each with its router and routed-experts units, then the input embedding), and
  each is kept while everything kept so far fits the *budget*: the bytes of sharded training
  state (parameters + gradients + AdamW moments) the rank holds anyway. So "auto" at most
  doubles the parameter-related memory of a rank (the root, always kept, aside), and keeps
  every unit on small meshes (all of the model's gathered parameters fit up to 4 FSDP shards in
  fp32, 8 with bf16 compute, when every parameter is trained).

Activations are not counted: on a tight memory budget pass `reshard_after_forward=True`.
The units themselves (`block_groups`: consecutive small blocks share one; `joining_root`: a
small embedding / lm head joins the root) follow `min_unit_bytes` and live here too, so the
pass, `plan` and "auto" agree on them.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from moetx.core.record import Applied, find_applied
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.structure.discovery import Block, ModelStructure, discover

__all__ = [
    "AUTO",
    "MIN_UNIT_BYTES",
    "ResidentChoice",
    "block_groups",
    "choose_resident",
    "experts_are_units",
    "gathered_bytes",
    "joining_root",
    "nested_units",
    "router_apart",
]

AUTO = "auto"
#: `FSDP.min_unit_bytes`'s default, 1 MiB: below it a collective's cost is its latency (tens of
#: microseconds on NCCL and gloo), not its bytes (1 MiB takes ~10 us at 100 GB/s), so merging
#: such units saves whole collectives for free; a real model's block (tens of MiB and more)
#: stays a unit of its own.
MIN_UNIT_BYTES = 1 << 20


def experts_are_units(experts: nn.Module, record: tuple[Applied, ...]) -> bool:
    """Whether `FSDP` makes these routed experts their own unit (`ExpertParallel` sharded them)."""
    ep = find_applied(record, "ep")
    return (
        ep is not None
        and bool(ep.facts.get("expert_params", ()))
        and any(isinstance(p, DTensor) for p in experts.parameters())
    )


def gathered_bytes(
    model: nn.Module, fsdp: Any, record: tuple[Applied, ...]
) -> dict[str, tuple[int, int, bool]]:
    """Parameter FQN -> (elements and bytes on a rank while gathered, whether a routed expert).

    Gathered means unsharded by FSDP only: routed experts stay split over `ep`, tensor-parallel
    weights over `tp`; the dtype is the unit's compute dtype (`param_dtype`, fp32 for the
    `fp32_modules`).
    """
    ep = find_applied(record, "ep")
    experts = set(ep.facts.get("expert_params", ())) if ep is not None else set()
    ep_degree = ep.facts.get("degree", 1) if ep is not None else 1
    tp = find_applied(record, "tp")
    tp_degree = tp.facts.get("degree", 1) if tp is not None else 1
    tp_sharded = set(tp.facts.get("params", ())) if tp is not None else set()
    s = discover(model)
    fp32: set[int] = set()
    if fsdp.param_dtype not in (None, "float32"):
        if "router" in fsdp.fp32_modules:
            fp32 |= {id(q) for layer in s.moe_layers() for q in layer.router.parameters()}
        if "lm_head" in fsdp.fp32_modules and s.lm_head is not None and not s.tied_embeddings:
            fp32 |= {id(q) for q in s.lm_head.parameters()}
    compute = getattr(torch, fsdp.param_dtype) if fsdp.param_dtype else None
    out: dict[str, tuple[int, int, bool]] = {}
    for name, p in model.named_parameters():
        numel = p.numel() // (
            ep_degree if name in experts else tp_degree if name in tp_sharded else 1
        )
        dtype = torch.float32 if id(p) in fp32 else (compute or p.dtype)
        out[name] = (numel, numel * torch.empty((), dtype=dtype).element_size(), name in experts)
    return out


def joining_root(
    model: nn.Module, s: ModelStructure, fsdp: Any, record: tuple[Applied, ...]
) -> tuple[nn.Module, ...]:
    """The input embedding and lm head that join the root unit instead of being their own.

    Each that gathers to fewer than `fsdp.min_unit_bytes` bytes, when the root is a unit and
    nothing needs them apart: untied embeddings, no tensor parallelism, and for the lm head no
    fp32 policy of its own and no `output_dtype` other than `param_dtype` (the root does not
    cast its inputs back). Two small units fewer: one all-gather and one reduce-scatter fewer
    each per step.
    """
    if not fsdp.wrap_root or s.tied_embeddings or find_applied(record, "tp") is not None:
        return ()
    low = fsdp.param_dtype not in (None, "float32")
    lm_apart = ("lm_head" in fsdp.fp32_modules and low) or fsdp.output_dtype not in (
        None,
        fsdp.param_dtype,
    )
    candidates = [m for m in (s.embedding, None if lm_apart else s.lm_head) if m is not None]
    if not candidates:
        return ()
    sizes = gathered_bytes(model, fsdp, record)
    by_id = {id(p): sizes[n][1] for n, p in model.named_parameters()}
    return tuple(
        m
        for m in candidates
        if sum(by_id.get(id(p), 0) for p in m.parameters()) < fsdp.min_unit_bytes
    )


def block_groups(
    model: nn.Module, s: ModelStructure, fsdp: Any, record: tuple[Applied, ...]
) -> list[tuple[Block, ...]]:
    """The transformer blocks by FSDP unit, in order: consecutive blocks may share one unit.

    A unit takes the next block while its dense parameters (those not in a routed-experts or
    fp32 router unit of their own) gather to fewer than `fsdp.min_unit_bytes` bytes; each block
    is its own unit when that is 0. A block whose parameter dtypes differ from the unit's first
    starts a new unit. One all-gather and one reduce-scatter per unit and step.
    """
    if fsdp.min_unit_bytes <= 0:
        return [(b,) for b in s.blocks]
    sizes = gathered_bytes(model, fsdp, record)
    by_id = {id(p): sizes[n][1] for n, p in model.named_parameters()}
    groups: list[tuple[Block, ...]] = []
    current: list[Block] = []
    total = 0
    first_dtypes: set[torch.dtype] = set()
    for block in s.blocks:
        apart = {id(p) for m in nested_units(block, fsdp, record) for p in m.parameters()}
        dense = [p for p in block.module.parameters() if id(p) not in apart]
        dtypes = {p.dtype for p in dense}
        if current and (total >= fsdp.min_unit_bytes or dtypes != first_dtypes):
            groups.append(tuple(current))
            current, total = [], 0
        if not current:
            first_dtypes = dtypes
        current.append(block)
        total += sum(by_id.get(id(p), 0) for p in dense)
    if current:
        groups.append(tuple(current))
    return groups


def nested_units(block: Block, fsdp: Any, record: tuple[Applied, ...]) -> list[nn.Module]:
    """The units of their own inside `block`: its routed experts (under `ExpertParallel`), then
    its router (fp32 policy with a low-precision `param_dtype`)."""
    moe, out = block.moe, []
    if moe is not None and experts_are_units(moe.experts, record):
        out.append(moe.experts)
    if moe is not None and router_apart(fsdp):
        out.append(moe.router)
    return out


def router_apart(fsdp: Any) -> bool:
    """Whether each router is an fp32 unit of its own: `"router"` in `fp32_modules` under a
    low-precision `param_dtype` (with `"float32"` the block's unit computes in fp32 already)."""
    return "router" in fsdp.fp32_modules and fsdp.param_dtype not in (None, "float32")


@attrs.frozen
class ResidentChoice:
    """What `reshard_after_forward="auto"` keeps gathered after forward, on every rank.

    Attributes:
        kept_units: FQNs of the units kept gathered (`""`: the root), in backward order.
        resharded_units: FQNs of the units resharded after forward.
        resident_params: FQNs of the parameters in the kept units.
        budget: Bytes per rank the kept units may take (the rank's sharded training state).
        resident: Bytes per rank they take.
    """

    kept_units: tuple[str, ...]
    resharded_units: tuple[str, ...]
    resident_params: tuple[str, ...]
    budget: int
    resident: int


def _units(
    model: nn.Module, s: ModelStructure, fsdp: Any, record: tuple[Applied, ...]
) -> tuple[list[tuple[nn.Module, ...]], bool]:
    """The FSDP units (each its modules: several blocks may share one), innermost first; root
    last."""
    units: list[tuple[nn.Module, ...]] = []
    for group in block_groups(model, s, fsdp, record):
        units += [(m,) for block in group for m in nested_units(block, fsdp, record)]
        units.append(tuple(b.module for b in group))
    if not s.tied_embeddings:
        joined = joining_root(model, s, fsdp, record)
        units += [
            (m,)
            for m in (s.embedding, s.lm_head)
            if m is not None and not any(m is j for j in joined)
        ]
    root = model if fsdp.wrap_root else s.final_norm
    if root is not None:
        units.append((root,))
    return units, fsdp.wrap_root


def choose_resident(
    model: nn.Module, fsdp: Any, degrees: MeshDegrees, record: tuple[Applied, ...]
) -> ResidentChoice:
    """Apply the module docstring's rule to `model` (before or after `FSDP` wrapped it)."""
    s = discover(model)
    units, has_root = _units(model, s, fsdp, record)
    fqn = {id(m): n for n, m in model.named_modules()}
    owner: dict[int, nn.Module] = {}
    for unit in units:  # innermost first: a parameter belongs to the first unit claiming it
        for p in (p for m in unit for p in m.parameters()):
            owner.setdefault(id(p), unit[0])  # a unit is named by its first module
    gathered = gathered_bytes(model, fsdp, record)
    expert_shards = degrees.dp_replicate * degrees.ep_shard
    budget = 0
    unit_bytes: dict[int, int] = {}
    unit_params: dict[int, list[str]] = {}
    for name, p in model.named_parameters():
        numel, size, expert = gathered[name]
        shards = expert_shards if expert else degrees.dp_shard_cp
        local = -(-numel // shards)  # FSDP2 pads the last shard: every rank holds ceil(n / shards)
        budget += local * p.element_size() * (4 if p.requires_grad else 1)
        first = owner.get(id(p))
        if first is not None:
            unit_bytes[id(first)] = unit_bytes.get(id(first), 0) + size
            unit_params.setdefault(id(first), []).append(name)
    # backward order: root, lm head / final norm, the blocks last to first, the embedding
    # (a unit of several blocks: where its last block is)
    order = sorted(units, key=lambda u: _backward_rank(u[-1], s, model, fsdp))
    kept: list[str] = []
    resharded: list[str] = []
    params: list[str] = []
    total = 0
    for unit in order:
        module = unit[0]
        size = unit_bytes.get(id(module), 0)
        is_root = has_root and module is model
        if is_root or total + size <= budget:
            total += size
            kept.append(fqn.get(id(module), ""))
            params += unit_params.get(id(module), [])
        else:
            resharded.append(fqn.get(id(module), ""))
    return ResidentChoice(tuple(kept), tuple(resharded), tuple(params), budget, total)


def _backward_rank(module: nn.Module, s: ModelStructure, model: nn.Module, fsdp: Any) -> int:
    if module is model or (not fsdp.wrap_root and module is s.final_norm):
        return 0
    if module is s.lm_head:
        return 1
    for i, block in enumerate(reversed(s.blocks)):
        moe = block.moe
        inner = (block.module, moe.router if moe else None, moe.experts if moe else None)
        if any(module is m for m in inner):
            return 2 + i
    return 2 + len(s.blocks)  # the input embedding
