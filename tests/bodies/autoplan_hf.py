"""Rank bodies for the Hugging Face auto-planner tests: measured activations and counted collectives."""

from __future__ import annotations

import gc
from typing import Any

import torch.distributed as dist

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees, ParallelMesh
from moetx.passes import ContextParallel
from moetx.planning.fake_world import fake_world
from moetx.planning.meter import LiveActivationMeter
from moetx.testing.hf import HFSpec, build_model, global_batches
from moetx.testing.train import mesh_for
from tests.bodies.autoplan import _axes
from tests.bodies.hf_context_parallel import rank_batches
from tests.bodies.predict_ring_sp import RingCountingMode

__all__ = ["hf_measure_step", "hf_one_process_activations"]


def hf_measure_step(spec: HFSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """One forward + backward of the spec's HF model under `pipeline` on this rank's rows.

    Returns `activations`: what `LiveActivationMeter` sees the forward leave alive (logits and
    loss excluded; under FSDP it also sees the parameters FSDP keeps gathered after forward),
    `comm`: the counted collectives per `kind[axis]` (`tests.bodies.autoplan.CountingMode`),
    and `ep_rank`.
    """
    mesh = mesh_for(degrees)
    model = pipeline.apply(build_model(spec), mesh)
    cp = next((p for p in pipeline if isinstance(p, ContextParallel)), None)
    extra: dict[str, Any] = {}
    if cp is not None:  # the CP recipe: labels shifted over whole rows, then this rank's chunk
        ids, labels, positions, _ = rank_batches(spec, cp, mesh, degrees, wrong=False)[0]
        extra = {"shift_labels": labels, "position_ids": positions}
    else:
        data_ranks = degrees.dp_replicate * degrees.dp_shard
        ids, labels = global_batches(spec, data_ranks)[0]
        index = mesh.data_rank
        rows = slice(index * spec.rows_per_rank, (index + 1) * spec.rows_per_rank)
        ids, labels = ids[rows], labels[rows]
    log = RingCountingMode(_axes(mesh))  # ring CP's sends too
    log.ep_gathers = any(getattr(p, "dispatcher", "") == "all_gather" for p in pipeline)
    gc.freeze()  # the meter collects garbage: scan only what this step makes
    try:
        with log:
            with LiveActivationMeter(exclude=[model, ids, labels]) as live:
                out = model(input_ids=ids, labels=labels, **extra)
            activations = live.live_bytes(exclude=[out.logits, out.loss])
            out.loss.backward()
    finally:
        gc.unfreeze()
    return {
        "activations": activations,
        "comm": log.comm(),
        "ep_rank": dist.get_rank(mesh["ep"].get_group()),
    }


def hf_one_process_activations(spec: HFSpec, pipeline: Pipeline) -> int:
    """What `LiveActivationMeter` sees one forward of the spec's HF model (under `pipeline`, on
    a fake world of one rank) leave alive on one process, on the global batch of one data rank."""
    with fake_world(1):
        model = pipeline.apply(build_model(spec), ParallelMesh.build(device_type="cpu"))
    ids, labels = global_batches(spec, 1)[0]
    gc.freeze()  # the meter collects garbage: scan only what this forward made
    try:
        with LiveActivationMeter(exclude=[model, ids, labels]) as live:
            out = model(input_ids=ids, labels=labels)
        return live.live_bytes(exclude=[out.logits, out.loss])
    finally:
        gc.unfreeze()
