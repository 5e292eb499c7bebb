"""What `ContextParallel` installs on a model: the input guard and the aux-loss statistics reducer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from moetx.core.errors import ContextParallelInputError, SequenceDivisibilityError

__all__ = ["InputGuard", "StatsReducer"]


class StatsReducer:
    """`moetx.models.StatsReducer` over the cp group: whole-sequence aux-loss statistics.

    Counts are summed without autograd (they are integers). Score sums are all-gathered with
    an autograd-aware collective and summed, so the backward sums every rank's gradient of
    the (identical) whole-sequence aux loss into each rank's local scores: averaged over the
    cp ranks (FSDP's mean over dp_shard x cp), that is the single-process gradient.
    """

    def __init__(self, mesh: DeviceMesh) -> None:
        self.mesh = mesh
        # Read once: under `torch.compile` a `DeviceMesh` call in forward is a graph break.
        self.group_name = mesh.get_group().group_name
        self.degree = mesh.size()

    def __call__(
        self, counts: Tensor, prob_sums: Tensor, seq_len: int
    ) -> tuple[Tensor, Tensor, int]:
        counts = funcol.all_reduce(counts, "sum", self.group_name)
        gathered = funcol.all_gather_single_autograd(prob_sums.contiguous(), 0, self.group_name)
        return counts, gathered.view(self.degree, *prob_sums.shape).sum(0), seq_len * self.degree

    def __repr__(self) -> str:
        return f"StatsReducer(degree={self.degree})"


class InputGuard:
    """Root forward pre-hook: refuses calls without `position_ids` and shards that do not fit.

    Each call all-gathers this rank's `[rows, local tokens]` over the cp group (two integers,
    one small collective per forward), so that every rank sees every rank's shape and all of
    them raise the same typed error. Without it, local lengths that differ made gloo abort a
    rank inside the K/V all-gather, and an odd length under the head-tail layout ran silently
    with a wrong causal mask.
    """

    def __init__(self, mesh: DeviceMesh, load_balance: bool) -> None:
        self.mesh = mesh
        self.load_balance = load_balance

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # `MoETransformer.forward(input_ids, labels=None, position_ids=None)`, HF's keyword name.
        positions = kwargs.get("position_ids", args[2] if len(args) > 2 else None)
        if positions is None:
            raise ContextParallelInputError(
                f"`{type(module).__name__}` is context-parallel and was called without "
                "`position_ids`.\n"
                "  fix: `ids, labels, positions = cp.shard_sequence(mesh, ids, labels)`, then "
                "`model(ids, labels=labels, position_ids=positions)`."
            )
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._check_shapes(ids if isinstance(ids, Tensor) and ids.dim() == 2 else positions)

    def _check_shapes(self, local: Tensor) -> None:
        if local.device.type == "meta":  # a planning trace: no data, no peers to compare with
            return
        degree = self.mesh.size()
        rows = local.shape[0] if local.dim() == 2 else 1
        mine = torch.tensor([rows, local.shape[-1]], dtype=torch.int64, device=local.device)
        every = funcol.all_gather_tensor(mine, 0, self.mesh.get_group())
        shapes = [tuple(pair) for pair in every.view(degree, 2).tolist()]
        fix = "  fix: cut the batch with `cp.shard_sequence(mesh, ids, labels)` on every cp rank"
        if len(set(shapes)) > 1:
            listed = ", ".join(f"rank {r}: [{b}, {s}]" for r, (b, s) in enumerate(shapes))
            raise ContextParallelInputError(
                "The local input shapes of a context-parallel model differ across the cp ranks "
                f"({listed}); every rank must hold the same number of rows and tokens.\n"
                f"{fix}, from the same whole sequences."
            )
        if self.load_balance and shapes[0][1] % 2:
            raise SequenceDivisibilityError(
                f"The local sequence length ({shapes[0][1]}) of a context-parallel model must "
                "be even: `ContextParallel(load_balance=True)` holds two equal chunks per rank.\n"
                f"{fix} (whole sequences of a multiple of 2 × cp tokens)."
            )
