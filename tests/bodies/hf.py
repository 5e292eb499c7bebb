"""Rank bodies for the Hugging Face model tests: training parity and the checkpoint round trip.

Each rank builds the same tiny HF model (`moetx.testing.hf`), parallelizes it with a pipeline and
trains on its rows of the global batch; the parent compares with the single-process reference.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.testing.hf import HFSpec, build_model, global_batches
from moetx.testing.parity import full_tensor
from moetx.testing.train import mesh_for, train

__all__ = ["eval_batch", "hf_rank_train", "hf_round_trip"]


def _rows(spec: HFSpec, degrees: MeshDegrees) -> slice:
    data_index = mesh_for(degrees).data_rank
    return slice(data_index * spec.rows_per_rank, (data_index + 1) * spec.rows_per_rank)


def hf_rank_train(spec: HFSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """Parallelize the spec's HF model with `pipeline` and train on this rank's rows.

    Returns `moetx.testing.train.train`'s results (per-step losses and full gradients, final
    full parameters) plus `state_dict_keys`: the parallel model's `state_dict()` keys.
    """
    rows = _rows(spec, degrees)
    data_ranks = degrees.dp_replicate * degrees.dp_shard
    batches: list[tuple[Any, ...]] = [
        (ids[rows], labels[rows]) for ids, labels in global_batches(spec, data_ranks)
    ]
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    result = train(model, batches, spec.lr)
    result["state_dict_keys"] = sorted(model.state_dict())
    return result


def eval_batch(spec: HFSpec) -> torch.Tensor:
    """A fixed batch of token ids, different from the training batches, for comparing logits."""
    g = torch.Generator().manual_seed(spec.seed + 2)
    return torch.randint(0, int(spec.config().vocab_size), (2, spec.seq_len), generator=g)


def hf_round_trip(
    spec: HFSpec, pipeline: Pipeline, degrees: MeshDegrees, checkpoint_dir: str
) -> dict[str, Any]:
    """Parallelize, train `spec.steps` steps, save a DCP checkpoint, and report logits.

    Returns:
        `logits`: the parallel model's logits on `eval_batch(spec)` (every rank feeds it whole);
        `full_state_dict`: `get_model_state_dict(..., full_state_dict=True)` (rank 0 only, else
        None); `state_dict_keys`: the parallel model's `state_dict()` keys.
    """
    rows = _rows(spec, degrees)
    data_ranks = degrees.dp_replicate * degrees.dp_shard
    batches: list[tuple[Any, ...]] = [
        (ids[rows], labels[rows]) for ids, labels in global_batches(spec, data_ranks)
    ]
    model = pipeline.apply(build_model(spec), mesh_for(degrees))
    train(model, batches, spec.lr)
    dcp.save(get_model_state_dict(model), checkpoint_id=checkpoint_dir)
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    with torch.no_grad():
        logits = full_tensor(model(eval_batch(spec)).logits)
    return {
        "logits": logits,
        "full_state_dict": {k: full_tensor(cast(torch.Tensor, v)) for k, v in full.items()}
        if dist.get_rank() == 0
        else None,
        "state_dict_keys": sorted(model.state_dict()),
    }
