"""Distributed checkpoints (DCP) of parallelized models and their optimizers, and full exports.

A moetx model keeps its original parameter names through every pass (expert parallelism keeps
global-shape experts under their global names, FSDP2 and activation checkpointing keep names),
so torch's `torch.distributed.checkpoint.state_dict` helpers see the same keys on every mesh.
`save_checkpoint` writes each rank's shards once (`dcp.save`); `load_checkpoint` reads them into
whatever sharding the loading model has (`dcp.load` reshards: another ep degree, another world
size, FSDP or not, or a plain module in a process without a process group). `full_state_dict`
gathers plain full tensors for hand-off (`save_pretrained`, `torch.save`).

A checkpoint is a directory: `.metadata` plus one `__{rank}_0.distcp` file per saving rank, and
one `.moetx-integrity-{rank}.json` per saving rank recording the size and SHA-256 of the files
that rank wrote. Its top-level keys are `"model"` (the model's state dict) and, when an optimizer
was saved, `"optim"` (its state keyed by parameter FQN, as `get_optimizer_state_dict` returns it).
Loading checks the model's keys and shapes against the metadata, each file against its record,
and unpickles nothing but DCP's own metadata types (`moetx.training.checkpoint_safety`); every failure is
a `CheckpointError` naming the file, the key or the shapes, raised alike on every rank.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from moetx.core.errors import CheckpointError
from moetx.structure.discovery import canonical_fqn
from moetx.structure.tensors import to_local
from moetx.training.checkpoint_safety import (
    SafeLoadPlanner,
    SafeReader,
    checkpoint_error,
    remove_manifests,
    stale_manifest_ranks,
    write_manifest,
)

__all__ = ["CheckpointError", "full_state_dict", "load_checkpoint", "save_checkpoint"]

_MODEL_KEY = "model"
_OPTIM_KEY = "optim"


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
    integrity: bool = True,
) -> None:
    """Save `model` (and `optimizer`) as a distributed checkpoint in the directory `path`.

    A collective: every rank of the process group calls it with the same `path`, on a file
    system they all see. Each rank writes its own shards; replicated tensors are written once.
    Expert tensors are saved under their global names with their global shapes, so the
    checkpoint loads on any mesh (see `load_checkpoint`). Without a process group it saves a
    plain module from one process.

    Built on `torch.distributed.checkpoint.state_dict.get_state_dict` (FSDP2, DTensor and
    plain parameters alike) and `torch.distributed.checkpoint.save`. Needs numpy.

    Args:
        path: Checkpoint directory (created if missing; existing files are overwritten).
        model: The (possibly parallelized) model.
        optimizer: Its optimizer; its state is saved under parameter FQNs.
        process_group: Group to save over (default: the default group).
        integrity: Record each file's size and SHA-256 (`.moetx-integrity-{rank}.json`;
            each rank hashes what it wrote, at about 1.7 GB/s), which `load_checkpoint`
            verifies.

    Raises:
        CheckpointError: A rank failed to write (its error, per rank).

    Example:
        >>> save_checkpoint("ckpt/step2", model, opt)  # doctest: +SKIP
    """
    path = os.fspath(path)
    if optimizer is None:
        state: dict[str, Any] = {_MODEL_KEY: get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {_MODEL_KEY: msd, _OPTIM_KEY: osd}
    rank, world = _rank_and_world(process_group)
    if integrity and os.path.isdir(path):  # records of files this save overwrites
        remove_manifests(path, [rank, *(stale_manifest_ranks(path, world) if rank == 0 else ())])
    try:
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=path, process_group=process_group)
    except CheckpointException as exc:
        raise checkpoint_error("Saving", path, exc) from None
    if integrity:
        write_manifest(path, rank, coordinator=rank == 0)
        if dist.is_available() and dist.is_initialized():
            # Return once every rank's record is written, so a load right after a save
            # (on any rank) never finds a file without its record.
            dist.barrier(group=process_group)


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
    verify: bool = True,
) -> None:
    """Load a checkpoint written by `save_checkpoint` into `model` (and `optimizer`) in place.

    The loading model may be parallelized differently from the saving one (another ep degree,
    world size or pipeline) or be a plain module in a process without a process group: DCP
    reads each rank's part of every tensor from whichever saved shards hold it. Every tensor
    comes back bit-exact. A collective when a process group exists: every rank calls it.

    The model's parameters must already be allocated (a meta-built model: `to_empty` first);
    no initialisation is needed, the load overwrites every parameter and persistent buffer.
    Non-persistent buffers (such as the routing-load counter `expert_load`) are not in a
    checkpoint: after `to_empty` they hold garbage until something sets them (`init_weights_`
    before loading does).
    A fresh optimizer gets its state created first (torch runs one step with zero gradients
    and lr 0, which leaves the parameters unchanged), then overwritten by the saved state.

    Args:
        path: Checkpoint directory.
        model: Model to load into; its keys must match the checkpoint's.
        optimizer: Optimizer to restore (its param groups' hyperparameters come back too).
        process_group: Group to load over (default: the default group).
        verify: Check each file read against the size and SHA-256 `save_checkpoint` recorded
            (when the checkpoint has records; each rank hashes the whole of every file it
            reads from). Missing and truncated files are reported either way.

    Raises:
        CheckpointError: `path` is not a checkpoint; an optimizer is asked for but the
            checkpoint has no optimizer state; the model does not fit the checkpoint (every
            key missing from it, every tensor of another shape, with both shapes); a file is
            missing, truncated or not as it was saved (named); the metadata or an entry would
            unpickle something other than checkpoint data. Raised on every rank alike.
    """
    path = os.fspath(path)
    reader = SafeReader(path, verify=verify)
    metadata = _read_metadata(path, reader)
    saved = {key.split(".", 1)[0] for key in metadata.state_dict_metadata}
    if optimizer is not None and _OPTIM_KEY not in saved:
        raise CheckpointError(
            f"The checkpoint `{path}` has no optimizer state (it was saved without an "
            "optimizer).\n  fix: call `load_checkpoint(path, model)` and start a fresh optimizer."
        )
    if optimizer is None:
        msd = get_model_state_dict(model)
        _load(path, {_MODEL_KEY: msd}, metadata, reader, process_group)
        set_model_state_dict(model, msd)
        return
    msd, osd = get_state_dict(model, optimizer)
    _load(path, {_MODEL_KEY: msd, _OPTIM_KEY: osd}, metadata, reader, process_group)
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def _load(
    path: str,
    state: dict[str, Any],
    metadata: Metadata,
    reader: SafeReader,
    process_group: dist.ProcessGroup | None,
) -> None:
    """`dcp.load` into `state` in place, after checking that it fits the checkpoint."""
    _check_fits(path, state, metadata)
    try:
        with _quiet_single_process():
            dcp.load(
                state,
                storage_reader=reader,
                planner=SafeLoadPlanner(),
                process_group=process_group,
            )
    except CheckpointException as exc:
        raise checkpoint_error("Loading", path, exc) from None


_MAX_LISTED = 20


def _check_fits(path: str, state: dict[str, Any], metadata: Metadata) -> None:
    """Raise naming every key of `state` the checkpoint lacks and every tensor shaped otherwise.

    Decided from the metadata and global shapes alone, so every rank raises the same error
    before any collective (DCP's own check raised a `CheckpointException` naming one key).
    """
    flat, _ = flatten_state_dict(state)
    saved = metadata.state_dict_metadata
    shapes, missing = [], []
    for key, value in flat.items():
        entry = saved.get(key)
        if entry is None:
            missing.append(f"  `{key}`: missing from the checkpoint")
        elif (
            isinstance(value, torch.Tensor)
            and isinstance(entry, TensorStorageMetadata)
            and tuple(value.shape) != tuple(entry.size)
        ):
            shapes.append(f"  `{key}`: checkpoint {list(entry.size)}, model {list(value.shape)}")
    if not shapes and not missing:
        return
    listed = (shapes + missing)[:_MAX_LISTED]
    more = len(shapes) + len(missing) - len(listed)
    raise CheckpointError(
        f"The checkpoint `{path}` does not fit the model: {len(shapes)} tensors differ in "
        f"shape and {len(missing)} are missing.\n"
        + "\n".join(listed)
        + (f"\n  … and {more} more" if more else "")
        + "\n  fix: build the model with the config it was saved with (and the same "
        "optimizer), or load into a model whose state dict has these keys and shapes."
    )


def _rank_and_world(process_group: dist.ProcessGroup | None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(process_group), dist.get_world_size(process_group)
    return 0, 1


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    # Without a process group DCP warns that it "assumes the intent" is one process; for
    # these functions that is documented behaviour, not a surprise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def _read_metadata(path: str, reader: SafeReader) -> Metadata:
    """The checkpoint's metadata, read safely (hash checked, restricted unpickling)."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(
            f"`{path}` is not a distributed checkpoint: it has no `.metadata` file.\n"
            "  fix: pass the directory given to `save_checkpoint`."
        )
    return reader.read_metadata()


def full_state_dict(model: nn.Module, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Return the model's state as plain, full CPU tensors under its original names.

    For hand-off (`save_pretrained`, `torch.save`, a single-process evaluator): DTensor
    parameters (FSDP shards, expert shards) are gathered to their global shapes, expert
    tensors sit under their global names, and wrapper segments (`_checkpoint_wrapped_module`)
    are not in the keys. Persistent buffers are included, non-persistent ones are not (as in
    `state_dict()`). Every returned tensor is a copy: later training does not change it.

    A collective when a process group exists: every rank calls it. With `rank0_only` (the
    default, which bounds memory) rank 0 gets the dict and every other rank gets `{}`;
    otherwise every rank gets the full dict. Without a process group it returns the whole
    state of the plain module.

    Args:
        model: The (possibly parallelized) model.
        rank0_only: Only rank 0 receives the tensors.

    Returns:
        FQN -> full CPU tensor (empty on ranks other than 0 under `rank0_only`).
    """
    if not (dist.is_available() and dist.is_initialized()):
        plain = {canonical_fqn(k): v for k, v in model.state_dict().items()}
        return {k: v.detach().to("cpu", copy=True) for k, v in plain.items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_model_state_dict(model, options=options)
    # Plain (non-DTensor) tensors come back as the live parameters themselves (`.cpu()` of a
    # CPU tensor is a no-op), so copy those; gathered DTensors are fresh tensors already.
    live = {_storage(t) for t in _local_tensors(model)}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        tensor = cast(torch.Tensor, value)
        out[key] = tensor.detach().clone() if _storage(tensor) in live else tensor
    return out


def _local_tensors(model: nn.Module) -> list[torch.Tensor]:
    tensors = [*model.parameters(), *model.buffers()]
    return [to_local(t) for t in tensors]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.device.type != "meta" else -1
