"""Which data a rank feeds the model: its rows of the global batch and its chunk of the sequence.

A mesh's data-parallel position (`ParallelMesh.data_rank` over dp_replicate x dp_shard) picks the
rows; context parallelism, read from the model's record, cuts the sequence (load-balanced chunk
order, global positions). torchtitan and NeMo Automodel do this inside their trainers; here it
is two public calls a researcher's own loop can make.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.data import Dataset, DistributedSampler

from moetx.core.errors import BatchError
from moetx.core.record import applied_passes, find_applied
from moetx.mesh import ParallelMesh, as_parallel_mesh

__all__ = ["IGNORE_INDEX", "RankBatch", "data_sampler", "shard_batch", "shift_labels"]

IGNORE_INDEX = -100
"""Label value that scores nothing (PyTorch's and Hugging Face's convention)."""


class RankBatch(NamedTuple):
    """What one rank feeds the model: `model(input_ids, labels=..., position_ids=...)`."""

    input_ids: Tensor
    labels: Tensor | None
    position_ids: Tensor | None


def data_sampler(
    dataset: Dataset[Any],
    mesh: ParallelMesh | DeviceMesh,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> DistributedSampler[Any]:
    """A `DistributedSampler` over the data ranks: the ranks of one cp group draw the same rows.

    Call `set_epoch(epoch)` on it each epoch, as with any `DistributedSampler`.
    """
    pmesh = as_parallel_mesh(mesh)
    return DistributedSampler(
        dataset,
        num_replicas=pmesh.data_size,
        rank=pmesh.data_rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )


def shift_labels(labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Position-aligned targets from next-token labels: `out[..., t] = labels[..., t + 1]`.

    Hugging Face models shift `labels` inside their loss; under context parallelism a rank holds
    chunks of the sequence, so the shift must happen on the whole sequence *before*
    `shard_batch` (the last token of a chunk is scored against the next chunk's first token).
    The last position gets `ignore_index`.
    """
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def shard_batch(
    model: nn.Module,
    mesh: ParallelMesh | DeviceMesh,
    input_ids: Tensor,
    labels: Tensor | None = None,
    position_ids: Tensor | None = None,
    *,
    rows: Literal["global", "local"] = "global",
) -> RankBatch:
    """This rank's part of a batch: its rows (data parallel) and sequence chunk (context parallel).

    Args:
        model: The parallelized model (its record says whether and how context parallelism cuts
            the sequence).
        mesh: The mesh the model was parallelized with.
        input_ids: `[B, S]` token ids of whole sequences.
        labels: Position-aligned targets (`shift_labels` for next-token labels), same shape.
        position_ids: Global positions, `[B, S]` or `[S]`; default `arange(S)` under CP.
        rows: `"global"`: `input_ids` is the global batch and this rank takes rows
            `[data_rank * B / data_size, (data_rank + 1) * B / data_size)`; `"local"`: the rows
            are already this rank's (e.g. from `data_sampler`).

    Raises:
        BatchError: the global batch's rows do not split evenly over the data ranks, or the mesh
            has cp > 1 but the model has no `ContextParallel`.
        SequenceDivisibilityError, ContextParallelInputError: from `ContextParallel`.
    """
    pmesh = as_parallel_mesh(mesh)
    if rows not in ("global", "local"):
        raise BatchError(f"`rows` must be 'global' or 'local' (got {rows!r}).")
    if rows == "global":
        n, size = input_ids.shape[0], pmesh.data_size
        if n % size:
            raise BatchError(
                f"The global batch has {n} rows, which do not split evenly over the mesh's "
                f"{size} data ranks (dp_replicate × dp_shard).\n"
                f"  fix: use a multiple of {size} rows, or pass this rank's rows with rows='local'."
            )
        take = slice(pmesh.data_rank * (n // size), (pmesh.data_rank + 1) * (n // size))
        input_ids = input_ids[take]
        labels = None if labels is None else labels[take]
        if position_ids is not None and position_ids.dim() == input_ids.dim():
            position_ids = position_ids[take]
    cp = find_applied(applied_passes(model), "cp")
    if cp is None:
        if pmesh.degree("cp") > 1:
            raise BatchError(
                f"The mesh has cp={pmesh.degree('cp')} but the model has no `ContextParallel`: "
                "the ranks of a cp group would read the same tokens and count them twice.\n"
                "  fix: add `ContextParallel()` to the pipeline, or build the mesh with cp=1."
            )
        return RankBatch(input_ids, labels, position_ids)
    shard_sequence = cp.pass_.shard_sequence  # type: ignore[attr-defined]
    ids, lab, pos = shard_sequence(pmesh, input_ids, labels, position_ids)
    return RankBatch(ids, lab, pos)
