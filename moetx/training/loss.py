"""The global token-mean loss for any data/cp layout, ignored labels and empty ranks included.

With ignored labels (-100) ranks score different numbers of tokens, so the mean of per-rank
means is not the global mean, and a rank whose tokens are all ignored gets 0/0 = NaN. Each rank
instead returns `sum(CE over its tokens) * world / N`, where `N` counts scored tokens over
every rank (one scalar all-reduce, started before forward so it overlaps). FSDP (and
`sync_gradients`) average gradients over the world's ranks, so the averaged gradient is the
gradient of `sum(CE) / N`, exactly the single-process loss on the global batch. An empty rank
contributes 0 to the loss and to every gradient; no rank ever sees NaN.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from moetx.mesh import ParallelMesh, as_parallel_mesh
from moetx.training.data import IGNORE_INDEX

__all__ = ["TokenCount", "count_tokens", "token_mean_loss"]


class TokenCount:
    """Scored tokens of one step: this rank's and, once the all-reduce is done, every rank's."""

    def __init__(self, labels: Tensor, mesh: ParallelMesh, ignore_index: int) -> None:
        self.local = (labels != ignore_index).sum().to(torch.float64)
        self._total = self.local.clone()
        # The token ranks hold different tokens (dp ranks different rows, cp ranks different
        # chunks; ep borrows these ranks); tp ranks share theirs, so they are left out.
        self._work = dist.all_reduce(self._total, group=mesh.tokens.get_group(), async_op=True)

    def total(self) -> Tensor:
        """Scored tokens over every rank (waits for the all-reduce)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._total


def count_tokens(
    labels: Tensor, mesh: ParallelMesh | DeviceMesh, *, ignore_index: int = IGNORE_INDEX
) -> TokenCount:
    """Start counting the step's scored tokens over every rank (call before forward to overlap)."""
    return TokenCount(labels, as_parallel_mesh(mesh), ignore_index)


def token_mean_loss(
    logits: Tensor,
    labels: Tensor,
    mesh: ParallelMesh | DeviceMesh,
    *,
    num_tokens: TokenCount | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """This rank's share of the global token-mean cross-entropy: backward it on every rank.

    The returned values' mean over ranks is the global-batch mean cross-entropy (what one
    process computes on the whole batch); their gradients, averaged as FSDP or `sync_gradients`
    average them, are that loss's gradients. Add the model's auxiliary losses (moetx models:
    `out.aux_loss`) as they are.

    Args:
        logits: `[..., V]` logits of this rank's tokens (any dtype; computed in float32).
        labels: Position-aligned targets of the same tokens (`shard_batch` output).
        mesh: The mesh the model was parallelized with.
        num_tokens: A `count_tokens(labels, mesh)` started earlier; counted here if None.
        ignore_index: Label value that scores nothing.
    """
    pmesh = as_parallel_mesh(mesh)
    count = (
        num_tokens
        if num_tokens is not None
        else count_tokens(labels, pmesh, ignore_index=ignore_index)
    )
    summed = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    total = count.total().clamp(min=1).to(summed.dtype)
    return summed * (pmesh.degrees.token_ranks / total)
