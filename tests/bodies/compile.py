"""Rank bodies for the `Compile` tests: train a compiled pipeline, return results and graphs.

Each body starts from a fresh dynamo cache (`torch._dynamo.reset()`): the pool's rank processes
live for the whole session, and compiled code kept from other tests' models would count against
dynamo's recompile limit.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.passes.compile import compile_report
from moetx.passes.context_parallel.api import ContextParallel
from moetx.testing.hf import HFSpec, build_model, global_batches
from moetx.testing.train import Trainer, TrainSpec, _rank_setup, mesh_for, train
from tests.bodies.hf_context_parallel import rank_batches, train_hf

__all__ = ["compile_bench", "compiled_hf_cp_train", "compiled_hf_train", "compiled_train"]


def _finish(model: nn.Module, result: dict[str, Any], started: float) -> dict[str, Any]:
    report = compile_report(model)
    result["graphs"] = {f: (s.graphs, s.graph_breaks) for f, s in report.blocks.items()}
    result["reasons"] = {f: s.reasons for f, s in report.blocks.items()}
    result["state_dict_keys"] = sorted(model.state_dict())
    result["seconds"] = time.perf_counter() - started
    return result


def compiled_train(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """`rank_train` on a fresh dynamo cache, plus `graphs`: block FQN -> (graphs, breaks)."""
    started = time.perf_counter()
    torch._dynamo.reset()
    model, batches = _rank_setup(spec, pipeline, degrees)
    return _finish(model, train(model, batches, spec.lr), started)


def compiled_hf_train(spec: HFSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """The HF model's `hf_rank_train` on a fresh dynamo cache, plus `graphs` as above."""
    started = time.perf_counter()
    torch._dynamo.reset()
    mesh = mesh_for(degrees)
    n = spec.rows_per_rank
    rows = slice(mesh.data_rank * n, (mesh.data_rank + 1) * n)
    data_ranks = degrees.dp_replicate * degrees.dp_shard
    batches: list[tuple[Any, ...]] = [
        (ids[rows], labels[rows]) for ids, labels in global_batches(spec, data_ranks)
    ]
    model = pipeline.apply(build_model(spec), mesh)
    return _finish(model, train(model, batches, spec.lr), started)


def compiled_hf_cp_train(spec: HFSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """The HF model under a pipeline holding `ContextParallel`: this rank's rows and sequence
    chunks (as `hf_cp_rank_train`), on a fresh dynamo cache, plus `graphs` as above."""
    started = time.perf_counter()
    torch._dynamo.reset()
    mesh = mesh_for(degrees)
    cp = next(p for p in pipeline if isinstance(p, ContextParallel))
    batches = rank_batches(spec, cp, mesh, degrees, wrong=False)
    model = pipeline.apply(build_model(spec), mesh)
    return _finish(model, train_hf(model, batches, spec.lr), started)


def compile_bench(
    spec: TrainSpec, eager: Pipeline, compiled: Pipeline, degrees: MeshDegrees
) -> dict[str, Any]:
    """Rank body of `benchmarks/compile.py`: the same model under `eager` and `compiled`.

    The first compiled step (forward + backward + AdamW) holds the compilation; the steady
    steps of both models are interleaved (eager, compiled, eager, ...) so CPU sharing weighs on
    both alike. Returns seconds: `first_eager`, `first_compiled`, `eager` and `compiled`
    (medians of the steady steps), and the compiled model's graphs per block.
    """
    torch._dynamo.reset()
    runs = {}
    for name, pipeline in (("eager", eager), ("compiled", compiled)):
        model, batches = _rank_setup(spec, pipeline, degrees)
        runs[name] = (model, Trainer(model, spec.lr), batches)
    out: dict[str, Any] = {}
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for step in range(spec.steps):
        for name, (_, trainer, batches) in runs.items():
            seconds = trainer.step(batches[step])["step_time"]
            if step == 0:
                out[f"first_{name}"] = seconds
            else:
                times[name].append(seconds)
    out |= {name: statistics.median(t) for name, t in times.items()}
    report = compile_report(runs["compiled"][0])
    out["graphs"] = {f: (s.graphs, s.graph_breaks) for f, s in report.blocks.items()}
    return out
