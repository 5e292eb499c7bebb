"""`FSDP`'s preconditions, checked before it changes anything (FSDP2 finds most only mid-forward)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moetx.core.errors import PassPreconditionError
from moetx.core.record import Applied, find_applied
from moetx.mesh.parallel_mesh import ParallelMesh
from moetx.passes.foreign import refuse_foreign_parallelism
from moetx.passes.fsdp.reshard import joining_root, router_apart
from moetx.structure.discovery import ModelStructure, discover

__all__ = ["check_fsdp"]


def check_fsdp(
    fsdp: Any, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]
) -> None:
    """Raise `PassPreconditionError` unless `fsdp` (an `FSDP`) can shard `model` on `mesh`: the
    blocks are discoverable, no foreign parallelism, an int `reshard_after_forward` divides
    every unit's shard group, one dtype per unit, an `output_dtype` that something casts back,
    and with `wrap_root=False` untied embeddings and every parameter in some unit."""
    structure = discover(model)
    if not structure.blocks:
        raise PassPreconditionError(
            f"`FSDP` found no transformer blocks in `{type(model).__name__}`; it shards one "
            "unit per block."
        )
    mesh.require("dp_shard_cp", by="FSDP")
    refuse_foreign_parallelism(model, record, by="FSDP")
    experts_sharded = _experts_sharded(mesh, record)
    _check_reshard_sizes(fsdp, mesh, experts_sharded)
    _check_unit_dtypes(fsdp, model, structure, experts_sharded, record)
    _check_output_dtype(fsdp, model, structure)
    if not fsdp.wrap_root:
        _check_tied(model, structure)
        covered = _unit_params(structure)
        left = [n for n, p in model.named_parameters() if id(p) not in covered]
        if left:
            raise PassPreconditionError(
                f"`FSDP(wrap_root=False)` would leave {len(left)} parameter(s) outside every "
                f"FSDP unit (first: `{left[0]}`); their gradients would never be averaged.\n"
                "  fix: keep `wrap_root=True`, or shard the outer model yourself."
            )


def _experts_sharded(mesh: ParallelMesh, record: tuple[Applied, ...]) -> bool:
    """Whether routed experts become their own units (a recorded ep of degree > 1)."""
    ep = find_applied(record, "ep")
    return ep is not None and mesh.degree(getattr(ep.pass_, "axis", "ep")) > 1


def _check_reshard_sizes(fsdp: Any, mesh: ParallelMesh, experts_sharded: bool) -> None:
    # FSDP2's rule (fsdp/_fully_shard/_fsdp_init.py, _get_post_forward_mesh_info): an int
    # must divide the unit's shard-group size; checked here, per unit mesh, not mid-apply.
    n = fsdp.reshard_after_forward
    if not isinstance(n, int) or isinstance(n, bool):
        return
    d = mesh.degrees
    groups = [("dense parameters", d.dp_shard_cp, "dp_shard × cp")]
    if experts_sharded:
        groups.append(("routed experts", d.dp_replicate * d.ep_shard, "dp_replicate × ep_shard"))
    sizes = [size for _, size, _ in groups]
    valid = tuple(k for k in range(2, min(sizes) + 1) if all(s % k == 0 for s in sizes))
    for what, size, axes in groups:
        if size % n:
            ranks = f"{size} rank" + ("s" if size != 1 else "")
            raise PassPreconditionError(
                f"`{fsdp!r}` cannot reshard the {what} to groups of {n}: their FSDP units "
                f"shard over {ranks} ({axes}), and FSDP2 needs a group size that divides it.\n"
                "  fix: use reshard_after_forward=True or False"
                + (f", or one of {valid}." if valid else ".")
            )


def _check_unit_dtypes(
    fsdp: Any,
    model: nn.Module,
    s: ModelStructure,
    experts_sharded: bool,
    record: tuple[Applied, ...],
) -> None:
    # FSDP2 needs one original dtype per unit, and checks it only at the first forward.
    unit_of: dict[int, str] = {}
    module_fqn = {id(m): n for n, m in model.named_modules()}

    def claim(module: nn.Module | None) -> None:
        if module is not None:
            for p in module.parameters():
                unit_of.setdefault(id(p), module_fqn.get(id(module), ""))

    for block in s.blocks:
        if block.moe is not None and experts_sharded:
            claim(block.moe.experts)
        if block.moe is not None and router_apart(fsdp):
            claim(block.moe.router)
        claim(block.module)
    if not s.tied_embeddings:
        joined = joining_root(model, s, fsdp, record)
        for m in (s.embedding, s.lm_head):
            if not any(m is j for j in joined):
                claim(m)
    claim(model if fsdp.wrap_root else s.final_norm)
    units: dict[str, list[tuple[str, torch.dtype]]] = {}
    for name, p in model.named_parameters():
        if id(p) in unit_of:
            units.setdefault(unit_of[id(p)], []).append((name, p.dtype))
    for unit, params in units.items():
        dtypes = sorted({str(dt) for _, dt in params})
        if len(dtypes) > 1:
            odd = next(name for name, dt in params if dt != params[0][1])
            where = f"`{unit}`" if unit else f"the root `{type(model).__name__}`"
            raise PassPreconditionError(
                f"`FSDP` would make {where} one FSDP unit with parameters of several dtypes "
                f"({', '.join(dtypes)}: e.g. `{odd}`), which FSDP2 refuses.\n"
                "  fix: give every parameter one dtype (`model.to(torch.float32)`) and set "
                "the compute dtype with `FSDP(param_dtype=...)`; to keep fp32 routers in a "
                "low-precision model, use `FSDP(param_dtype='bfloat16')`, which makes each "
                "router its own fp32 unit."
            )


def _check_output_dtype(fsdp: Any, model: nn.Module, s: ModelStructure) -> None:
    # FSDP2 casts a unit's outputs to `output_dtype`, and its inputs to `param_dtype` only
    # when that is set: where nothing casts back, the first forward fails in a matmul.
    out = getattr(torch, fsdp.output_dtype) if fsdp.output_dtype else None
    if out is None:
        return
    if fsdp.param_dtype is None:
        weights = sorted({str(p.dtype) for p in model.parameters() if p.dtype != out})
        if weights:
            raise PassPreconditionError(
                f"`{fsdp!r}` casts every unit's output to {out}, but without `param_dtype` "
                f"no unit casts its inputs back, so the next one would get {out} "
                f"activations for {', '.join(weights)} weights (FSDP2 fails at the first "
                "forward).\n"
                "  fix: set `param_dtype` too (each unit then casts its inputs to it), or "
                "leave `output_dtype` out."
            )
    elif s.tied_embeddings and fsdp.output_dtype != fsdp.param_dtype:
        raise PassPreconditionError(
            f"`{fsdp!r}` would feed {out} block outputs to the tied lm head, which computes "
            f"in the root unit with {getattr(torch, fsdp.param_dtype)} weights and no input "
            "cast (FSDP2 fails at the first forward).\n"
            "  fix: leave `output_dtype` out or equal to `param_dtype`, or build the model "
            "with untied embeddings (`tie_embeddings=False`)."
        )


def _check_tied(model: nn.Module, structure: ModelStructure) -> None:
    if not structure.tied_embeddings or structure.embedding is None:
        return
    tied = {id(p) for p in structure.embedding.parameters()}
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in tied]
    if names:
        also = ", ".join(f"`{n}`" for n in names[1:])
        raise PassPreconditionError(
            f"`FSDP(wrap_root=False)` cannot shard the tied weight `{names[0]}` (also "
            f"{also}): tied weights belong to the root unit, so without it this weight "
            "would stay a plain per-rank tensor whose gradient is never averaged, and the "
            "ranks would diverge after the first step.\n"
            "  fix: keep `wrap_root=True`, or build the model with untied embeddings "
            "(`tie_embeddings=False`)."
        )


def _unit_params(s: ModelStructure) -> set[int]:
    """The parameters of the units `FSDP(wrap_root=False)` makes (blocks, embeddings, norm)."""
    mods: list[nn.Module] = [b.module for b in s.blocks]
    mods += [m for m in (s.embedding, s.lm_head, s.final_norm) if m is not None]
    return {id(p) for m in mods for p in m.parameters()}
