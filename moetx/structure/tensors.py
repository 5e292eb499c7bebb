"""Local views of possibly-distributed tensors: one place for the DTensor-or-plain checks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def to_local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (differentiable), or `t` itself if it is a plain tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds for `tensors` (local shards of DTensors)."""
    return sum(to_local(t).numel() * to_local(t).element_size() for t in tensors)
