"""Rank bodies for `TensorParallel`: placements and typed refusals on real meshes."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from moetx import MeshDegrees, MoetxError, Pipeline
from moetx.testing.train import TrainSpec, build_model, mesh_for


def placements(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """Every parameter's mesh dim names and placements (plain tensors: `()`), after `pipeline`."""
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    out: dict[str, Any] = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            out[name] = (p.device_mesh.mesh_dim_names, tuple(str(x) for x in p.placements))
        else:
            out[name] = ()
    return out


def refusal(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """The typed error `pipeline.apply` raises, and whether the model kept its parameters."""
    model = build_model(spec)
    before = {n: p for n, p in model.named_parameters()}
    classes = {n: type(m) for n, m in model.named_modules()}
    try:
        pipeline.apply(model, mesh_for(degrees))
    except MoetxError as e:
        untouched = {n: p for n, p in model.named_parameters()} == before and classes == {
            n: type(m) for n, m in model.named_modules()
        }
        return {"error": type(e).__name__, "message": str(e), "untouched": untouched}
    return {"error": None}


def residual_shapes(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """Input shapes seen by a block norm, an attention and an MoE block in one forward."""
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    seen: dict[str, Any] = {}
    block = model.model.layers[-1]
    probes = (
        ("norm", block.post_attention_layernorm),
        ("attention", block.self_attn.q_proj),
        ("moe", block.mlp.gate),
    )
    for name, module in probes:

        def record(m: Any, args: tuple[Any, ...], name: str = name) -> None:
            seen.setdefault(name, tuple(args[0].shape))

        module.register_forward_pre_hook(record, prepend=True)  # before the TP/SP input hooks
    ids = torch.zeros(2, spec.seq_len, dtype=torch.long)
    model(ids)
    return seen


def sequence_error(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, seq: int) -> str:
    """The message a forward on `seq` tokens raises (every tp rank), or 'no error'."""
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    try:
        model(torch.zeros(1, seq, dtype=torch.long))
    except MoetxError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"
