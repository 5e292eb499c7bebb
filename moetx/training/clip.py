"""Gradient-norm clipping over parameters that live on different device meshes.

A parallelized MoE model mixes gradients on several meshes: dense FSDP shards on dp_shard x cp,
expert shards on (ep_shard, ep), and plain tensors replicated on every rank. torch's
`clip_grad_norm_` stacks per-parameter norms, which fails when DTensors sit on different meshes
(pytorch#180346), and hand-rolled versions have reduced each group over the wrong ranks, so each
expert-parallel group got its own "global" norm (NeMo Automodel#3816). Here each gradient
contributes exactly once: the sum of |g|^p of the local shards is all-reduced over the mesh
axes the tensor is sharded along, and never over the axes it is replicated along.

NaN travels as an explicit flag beside each partial sum: gloo's MAX all-reduce drops a NaN that
sits on a rank other than 0 (TORCH-CPU-NOTES §9), so reducing the values alone let every rank
agree on a finite inf-norm while a gradient was NaN, and the NaN reached the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.placement_types import Placement, Shard, _StridedShard

from moetx.structure.tensors import to_local

__all__ = ["clip_grad_norm_", "grad_norm"]


def clip_grad_norm_(
    parameters: nn.Module | Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Scale gradients in place so that their one global norm is at most `max_norm`.

    The norm is that of all gradients concatenated as full tensors, the number a single
    process holding the whole model would compute (`torch.nn.utils.clip_grad_norm_`), and
    every rank gets the same value and applies the same scale. Gradients may be DTensors on
    different meshes (dense FSDP shards, expert shards, HSDP) or plain tensors; plain tensors
    are taken to be replicated (identical on every rank), so they count once. A plain gradient
    that differs between ranks, such as a dense gradient under expert parallelism without
    FSDP before it is averaged, must be averaged first.

    A collective: every rank calls it with the same parameters in the same order, each with or
    each without a gradient. One all-reduce per distinct (mesh, sharded axes) combination.

    Args:
        parameters: A module (its parameters), a tensor, or an iterable of tensors. Tensors
            without a gradient are skipped; shared tensors count once.
        max_norm: Largest allowed norm.
        norm_type: p of the p-norm; `float("inf")` for the max-norm; 0 counts the gradients
            with a nonzero entry, as torch's does.
        error_if_nonfinite: Raise if the total norm is NaN or infinite (gradients unchanged).

    Returns:
        The total norm before clipping, a plain (not DTensor) 0-dim float32 tensor on the
        gradients' device, equal on every rank.

    Raises:
        RuntimeError: `error_if_nonfinite` and the norm is not finite.

    Example:
        >>> norm = clip_grad_norm_(model, 1.0)  # doctest: +SKIP
    """
    grads = _grads(parameters)
    total = grad_norm(grads, norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} of the gradients is non-finite "
            f"({float(total)}), so they cannot be clipped.\n"
            "  fix: find the NaN/inf gradient, or pass `error_if_nonfinite=False`."
        )
    # The same formula as torch.nn.utils.clip_grad_norm_, so the results match it.
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        local = to_local(g)
        by_device.setdefault(local.device, []).append(local)
    for device, tensors in by_device.items():
        torch._foreach_mul_(tensors, coef.to(device))
    return total


def grad_norm(grads: Iterable[Tensor], norm_type: float = 2.0) -> Tensor:
    """Return the global p-norm of `grads` (DTensors on any meshes, or replicated tensors).

    The computation behind `clip_grad_norm_`, without the scaling; a collective, see there.

    Args:
        grads: Gradient tensors (not parameters).
        norm_type: p of the p-norm; `float("inf")` for the max-norm; 0 for torch's count of
            tensors with a nonzero entry.

    Returns:
        A plain 0-dim float32 tensor, equal on every rank.

    Raises:
        ValueError: `norm_type` is negative (or NaN).
    """
    p = float(norm_type)
    if not (p >= 0):
        raise ValueError(f"`norm_type` ({norm_type}) must be 0, positive or inf.")
    if p == 0:
        return _nonzero_count(grads)
    is_inf = math.isinf(p)
    op = dist.ReduceOp.MAX if is_inf else dist.ReduceOp.SUM
    # Local sums of |g|^p (max |g| for inf), one per set of groups to reduce over, each as
    # `[value without NaN, NaN flag]`. Dicts keep the order of first appearance, the same on
    # every rank, so the collectives line up.
    sums: dict[tuple[int, ...], Tensor] = {}
    groups_of: dict[tuple[int, ...], tuple[dist.ProcessGroup, ...]] = {}
    for g in grads:
        local, groups = _local_and_groups(g)
        if local.numel():
            value = torch.linalg.vector_norm(local, p, dtype=torch.float32)
            value = value if is_inf else value.pow(p)
        else:  # an empty shard (more ranks than rows); inf-norm has no identity otherwise
            value = torch.zeros((), dtype=torch.float32, device=local.device)
        key = tuple(id(group) for group in groups)
        groups_of[key] = groups
        flagged = _with_nan_flag(value)
        sums[key] = _combine(sums[key], flagged, is_inf) if key in sums else flagged
    total: Tensor | None = None
    for key, value in sums.items():
        for group in groups_of[key]:
            dist.all_reduce(value, op=op, group=group)
        total = value if total is None else _combine(total, value, is_inf)
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    norm = total[0] if is_inf else total[0].pow(1.0 / p)
    return torch.where(total[1] > 0, torch.full_like(norm, math.nan), norm)


def _nonzero_count(grads: Iterable[Tensor]) -> Tensor:
    """torch's `norm_type=0`: how many gradients have a nonzero (or NaN) entry anywhere.

    torch takes the 0-"norm" of each tensor (its nonzero count) and then of those counts, so
    the result counts tensors, not entries. Here each tensor's local counts are summed over
    the groups it is sharded over first, so a gradient counts once whichever ranks hold its
    nonzero entries. One all-reduce per distinct set of groups, as for the other norms.
    """
    counts: dict[tuple[int, ...], list[Tensor]] = {}
    groups_of: dict[tuple[int, ...], tuple[dist.ProcessGroup, ...]] = {}
    for g in grads:
        local, groups = _local_and_groups(g)
        key = tuple(id(group) for group in groups)
        groups_of[key] = groups
        counts.setdefault(key, []).append(torch.count_nonzero(local).to(torch.float32))
    total: Tensor | None = None
    for key, values in counts.items():
        per_tensor = torch.stack(values)
        for group in groups_of[key]:
            dist.all_reduce(per_tensor, op=dist.ReduceOp.SUM, group=group)
        found = (per_tensor > 0).sum().to(torch.float32)
        total = found if total is None else total + found
    return torch.zeros((), dtype=torch.float32) if total is None else total


def _with_nan_flag(value: Tensor) -> Tensor:
    """`[value, 0]`, or `[0, 1]` when `value` is NaN: flags survive MAX and SUM on any backend."""
    nan = torch.isnan(value)
    return torch.stack([torch.where(nan, torch.zeros_like(value), value), nan.to(value.dtype)])


def _combine(a: Tensor, b: Tensor, is_inf: bool) -> Tensor:
    return torch.maximum(a, b) if is_inf else a + b


def _grads(parameters: nn.Module | Tensor | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(parameters, nn.Module):
        params: Iterable[Tensor] = parameters.parameters()
    elif isinstance(parameters, Tensor):
        params = [parameters]
    else:
        params = parameters
    seen: set[int] = set()
    grads = []
    for p in params:
        if id(p) in seen or p.grad is None:
            continue
        seen.add(id(p))
        grads.append(p.grad)
    return grads


def _local_and_groups(g: Tensor) -> tuple[Tensor, tuple[dist.ProcessGroup, ...]]:
    """The local data of `g` and the groups its |g|^p sums must be reduced over."""
    if not isinstance(g, DTensor):
        return g.detach(), ()
    if any(pl.is_partial() for pl in g.placements):
        # Pending sums: finish them first (rare for gradients; FSDP2 reduces them already).
        placements: list[Placement] = [
            Replicate() if pl.is_partial() else pl for pl in g.placements
        ]
        g = g.redistribute(g.device_mesh, placements)
    return g.to_local().detach(), _sharded_groups(g.device_mesh, g.placements)


def _sharded_groups(
    mesh: DeviceMesh, placements: tuple[Placement, ...]
) -> tuple[dist.ProcessGroup, ...]:
    if mesh.get_coordinate() is None:  # this rank is outside the mesh: it holds nothing
        return ()
    return tuple(
        mesh.get_group(dim)
        for dim, pl in enumerate(placements)
        if isinstance(pl, (Shard, _StridedShard)) and mesh.size(dim) > 1
    )
