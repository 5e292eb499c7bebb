"""Counter-based parameter init: each value is a pure function of (seed, FQN, global index).

Why counter-based: a model built on `meta` may be sharded (expert parallel, FSDP) before its
parameters exist. Each rank then fills only its local shard of each DTensor, and must get
exactly the values the eager, single-process model has. A hash of the element's *global*
index gives that without a collective and without allocating the full tensor.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial, Shard, _StridedShard

from moetx.models.layers import RMSNorm
from moetx.structure.discovery import canonical_fqn
from moetx.structure.tensors import to_local

__all__ = ["INIT_STD", "hashed_uniform", "init_weights_", "local_global_indices"]

INIT_STD = 0.02
"""Standard deviation of every matrix and embedding (uniform, so bound `INIT_STD * sqrt(3)`)."""

_NORMS = (RMSNorm, nn.RMSNorm, nn.LayerNorm)
_ZERO_BUFFERS = ("e_score_correction_bias", "expert_load")
_CHUNK_ELEMENTS = 1 << 22  # bounds the int64 scratch memory per generation step


def _int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's `>>` on int64 is arithmetic; mask off the sign copies for a logical shift.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _key(seed: int, fqn: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{fqn}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def hashed_uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """Map int64 `index` to float64 uniform values in (-1, 1) with splitmix64.

    int64 multiplication wraps around on overflow, which is exactly the mod-2^64 arithmetic
    splitmix64 needs, on CPU and CUDA alike.

    Args:
        key: Stream key (a signed 64-bit int).
        index: Any-shape int64 tensor of element indices.
    """
    z = (index + 1) * _GOLDEN + key
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    top24 = _shift_right(z, 40).double()
    return (top24 + 0.5) * (2.0 / (1 << 24)) - 1.0


def local_global_indices(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Return, per dim, the global indices that the local data of `tensor` covers.

    A plain tensor covers `arange(size)` in every dim. For a DTensor, the placements are
    applied left to right to each dim's `arange` using the placements' own splitting rule
    (`_split_tensor`, the rule `distribute_tensor` uses), which handles `Shard`,
    `_StridedShard` (FSDP2 over an already sharded dim, whose local indices are not
    contiguous, so `compute_local_shape_and_global_offset`'s single offset is not enough)
    and `Replicate`. Only 1-D index vectors are built, never the full tensor.

    Raises:
        ValueError: For `Partial` placements (no single value per element).
    """
    indices = [torch.arange(n, device=tensor.device) for n in tensor.shape]
    if not isinstance(tensor, DTensor):
        return indices
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank holds no data
        return [i[:0] for i in indices]
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Partial):
            raise ValueError(f"Cannot initialise a DTensor with a `{placement}` placement.")
        if isinstance(placement, (Shard, _StridedShard)):
            dim = placement.dim
            as_dim = indices[dim].view([1] * dim + [-1])
            chunks, _ = placement._split_tensor(
                as_dim, mesh.size(mesh_dim), with_padding=False, contiguous=False
            )
            rank = coordinate[mesh_dim]
            indices[dim] = chunks[rank].reshape(-1) if rank < len(chunks) else indices[dim][:0]
    return indices


def _fill_hashed(local: torch.Tensor, indices: list[torch.Tensor], shape: torch.Size, key: int):
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    bound = INIT_STD * math.sqrt(3.0)
    if local.dim() == 0:
        local.fill_(bound * float(hashed_uniform(key, torch.zeros((), dtype=torch.int64))))
        return
    rest = math.prod(local.shape[1:])
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(rest, 1))
    for start in range(0, local.shape[0], rows_per_chunk):
        rows = indices[0][start : start + rows_per_chunk]
        linear = (rows * strides[0]).view([-1] + [1] * (local.dim() - 1))
        for d in range(1, local.dim()):
            linear = linear + (indices[d] * strides[d]).view(
                [1] * d + [-1] + [1] * (local.dim() - d - 1)
            )
        values = bound * hashed_uniform(key, linear)
        local[start : start + rows.numel()].copy_(values.to(local.dtype))


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int = 0) -> None:
    """Initialise every parameter and the router buffers of `model` in place, deterministically.

    Norm weights become 1, biases 0, the routing-bias and load-counter buffers 0, and every
    other parameter uniform with std `INIT_STD`, element `i` (row-major *global* index) of the
    parameter named `fqn` drawn as `hashed_uniform(key(seed, fqn), i)`. FQNs are taken relative
    to `model` with wrapper segments (`_checkpoint_wrapped_module`, ...) removed, so wrapped,
    sharded or meta-built-then-`to_empty` copies get the eager model's values. Tied parameters
    are re-tied first (via `model.tie_weights()` when present) and filled once. DTensors fill
    only their local shard. Other buffers are left as they are.

    Args:
        model: The root the FQNs are relative to (e.g. a `MoETransformer`).
        seed: Stream seed.

    Raises:
        ValueError: If a parameter is still on the `meta` device (call `to_empty` first).
    """
    tie_weights = getattr(model, "tie_weights", None)
    if callable(tie_weights):
        tie_weights()
    for fqn, param in model.named_parameters():
        if param.device.type == "meta":
            raise ValueError(
                f"`{fqn}` is on the meta device; call `model.to_empty(device=...)` before "
                "`init_weights_`."
            )
        module_name, _, leaf = fqn.rpartition(".")
        owner = model.get_submodule(module_name)
        local = to_local(param)
        if leaf == "bias":
            local.zero_()
        elif isinstance(owner, _NORMS):
            local.fill_(1.0)
        else:
            indices = local_global_indices(param)
            if tuple(len(i) for i in indices) != tuple(local.shape):
                raise RuntimeError(
                    f"`{fqn}`: local shape {tuple(local.shape)} does not match the shard "
                    f"computed from its placements ({tuple(len(i) for i in indices)})."
                )
            _fill_hashed(local, indices, param.shape, _key(seed, canonical_fqn(fqn)))
    for fqn, buffer in model.named_buffers():
        if fqn.rpartition(".")[2] in _ZERO_BUFFERS:
            buffer.zero_()
