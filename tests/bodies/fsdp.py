"""Rank bodies for the FSDP tests: placements and byte counts of a parallelized model."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from moetx.core.algebra import Pipeline
from moetx.core.errors import MoetxError
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.passes.fsdp.api import FSDP
from moetx.structure.discovery import discover
from moetx.testing.parity import parameters
from moetx.testing.train import Trainer, TrainSpec, _rank_setup, build_model, mesh_for


def placements(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """FQN -> (mesh dim names, placements as strings, local numel) after `pipeline`."""
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    out: dict[str, Any] = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            out[name] = (
                tuple(p.device_mesh.mesh_dim_names or ()),
                tuple(repr(pl) for pl in p.placements),
                p.to_local().numel(),
                p.numel(),
            )
        else:
            out[name] = ((), (), p.numel(), p.numel())
    return out


def tied_after_fsdp(spec: TrainSpec, degrees: MeshDegrees) -> bool:
    """Whether the lm head and the input embedding still share one parameter after FSDP."""

    model: Any = FSDP().apply(build_model(spec), mesh_for(degrees))
    return model.lm_head.weight is model.model.embed_tokens.weight


def load_counts_and_dtypes(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees
) -> dict[str, Any]:
    """One forward/backward on this rank's part of the first batch (its rows, and its sequence
    chunk under context parallelism): routing-load counters and compute dtypes seen."""

    model: Any
    model, batches = _rank_setup(spec, pipeline, degrees)
    seen: dict[str, Any] = {}
    s = discover(model)
    for name, mod in (("router", s.moe_layers()[0].router), ("attention", s.blocks[0].attention)):
        mod.register_forward_pre_hook(
            lambda m, a, name=name: seen.__setitem__(name, next(iter(m.parameters())).dtype)
        )
    if s.lm_head is not None:
        s.lm_head.register_forward_pre_hook(
            lambda m, a: seen.__setitem__("lm_head", m.weight.dtype)
        )
    ids, labels, *positions = batches[0]
    model(ids, labels=labels, position_ids=positions[0] if positions else None).loss.backward()
    counts = {
        layer.fqn: layer.router.get_buffer("expert_load").clone()
        for layer in s.moe_layers()
        if getattr(layer.router, "expert_load", None) is not None
    }
    return {"counts": counts, "dtypes": seen}


def prefetch_targets(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees
) -> dict[str, tuple[list[str], list[str], bool]]:
    """Unit (its first module's FQN, `""`: the root) -> the units it prefetches in forward and
    in backward, and whether its all-gathers are asynchronous (FSDP2's private state)."""

    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    name: dict[int, str] = {}
    units = []
    for fqn, m in model.named_modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()
            if id(state) not in name:
                name[id(state)] = fqn
                units.append(state)
    return {
        name[id(s)]: (
            [name[id(t)] for t in s._states_to_forward_prefetch],
            [name[id(t)] for t in s._states_to_backward_prefetch],
            all(g.unshard_async_op for g in s._fsdp_param_groups),
        )
        for s in units
    }


class _Outer(nn.Module):
    """A caller's own module around the parallelized model (no parameters of its own)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def outer_root_train(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, *, wrap_outer: bool
) -> dict[str, Any]:
    """`rank_train` with the model called through an outer module, which the caller makes the
    FSDP root (`fully_shard`, over the dense FSDP mesh) when `wrap_outer`; otherwise the error
    the first forward raises (its type name and message)."""

    model, batches = _rank_setup(spec, pipeline, degrees)
    outer = _Outer(model)
    if wrap_outer:
        fully_shard(outer, mesh=mesh_for(degrees).dense_fsdp_mesh())
    trainer = Trainer(model, spec.lr)
    trainer.forward = lambda ids, labels, position_ids=None: outer(
        ids, labels=labels, position_ids=position_ids
    )
    try:
        steps = [trainer.step(batch) for batch in batches]
    except MoetxError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {
        "losses": [s["loss"] for s in steps],
        "grads": [s["grads"] for s in steps],
        "params": parameters(model),
    }
