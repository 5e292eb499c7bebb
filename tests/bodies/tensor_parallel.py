"""Rank bodies for `TensorParallel`: placements and typed refusals on real meshes."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from moetx import MeshDegrees, MoetxError, Pipeline
from moetx.structure.tensors import local_bytes
from moetx.testing.train import TrainSpec, build_model, global_batches, mesh_for


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


class CollectiveCounter(TorchDispatchMode):
    """Counts every collective op (functional and c10d) by name: one step's communication."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._overloadpacket.__name__
        if func.namespace in ("_c10d_functional", "c10d") and not name.startswith(
            ("wait", "barrier", "monitored", "_wrap_tensor")
        ):
            self.calls[name.rstrip("_")] += 1
        return func(*args, **(kwargs or {}))


def bench_step(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, steps: int
) -> dict[str, Any]:
    """Median step time after 2 warm-up steps, one step's collectives, local param/grad bytes."""
    mesh = mesh_for(degrees)
    model = pipeline.apply(build_model(spec), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    ids, labels = global_batches(spec, mesh.data_size)[0]
    rows = slice(mesh.data_rank * spec.rows_per_rank, (mesh.data_rank + 1) * spec.rows_per_rank)
    batch = (ids[rows], labels[rows])

    def step() -> None:
        model(batch[0], labels=batch[1]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    counter = CollectiveCounter()
    with counter:
        step()
    return {
        "seconds": statistics.median(times),
        "collectives": dict(counter.calls),
        "param_bytes": local_bytes(model.parameters()),
        "grad_bytes": local_bytes(p.grad for p in model.parameters() if p.grad is not None),
    }
