"""`FSDP(prefetch=n)`: each unit starts the all-gathers of the next `n` units, forward and backward.

FSDP2 all-gathers a unit when it is called (forward) or when its gradients are due (backward,
where it also prefetches the unit after it in reverse post-forward order). Explicit prefetch
(`FSDPModule.set_modules_to_forward_prefetch` / `set_modules_to_backward_prefetch`, as torchtitan
sets them) starts them one or more units earlier, so they run while the current unit computes:

- forward order: the root, the input embedding, each unit of blocks, the lm head (the final
  norm before it, a unit of its own without the root unit); a unit of blocks also starts the
  units nested in its blocks (router, then routed experts: called inside the block, on another
  mesh or dtype; without explicit prefetch they are gathered only when called). Nested units
  prefetch nothing in forward: under activation checkpointing backward re-runs a block's
  forward, where FSDP2 skips the block's own forward prefetch (its state is pre-backward) but
  not a nested unit's, which would gather the next block's experts, already resharded after
  their backward, a second time;
- backward order: the root, the lm head (then the final norm), the units of blocks from the
  last, each followed by its nested units (routed experts, then router, last block first), the
  input embedding. The root keeps FSDP2's own prefetch of the unit after it: its pre-backward
  hook runs once per output tensor with a gradient, and an aux loss's arrives after the lm
  head's backward, where an explicit list would gather the lm head again.

A prefetch is an earlier `unshard` only: a unit already gathered (kept by "auto", or prefetched)
is not gathered again; every collective stays the same, only its start moves. On gloo the
units' own all-gathers become asynchronous too (FSDP2's `_set_unshard_async_op`): a synchronous
gloo all-gather would block the CPU that is meant to compute meanwhile; NCCL overlaps on its own
streams and keeps FSDP2's default.

`FSDP`'s default is `prefetch=1`: on issue 17's workload (gloo, CPU; `benchmarks/README.md`)
one unit ahead took 0.84-0.99 of the step time without prefetch where units are all-gathered
again in backward, and was within noise where "auto" keeps them gathered; two was not better
than one. One unit ahead is also what FSDP2 holds gathered by its own prefetch on GPUs, and
what `predict`'s FSDP buffers (the two largest units) assume.
"""

from __future__ import annotations

import typing
from typing import Any

from torch import nn
from torch.distributed.fsdp import FSDPModule

from moetx.core.record import Applied
from moetx.passes.fsdp.reshard import block_groups, joining_root, nested_units
from moetx.structure.discovery import ModelStructure

__all__ = ["set_prefetch", "unit_orders"]


def unit_orders(
    model: nn.Module, s: ModelStructure, fsdp: Any, record: tuple[Applied, ...]
) -> tuple[list[tuple[nn.Module, list[nn.Module]]], list[nn.Module]]:
    """The units `FSDP` makes (each named by its first module): the top-level ones in forward
    order, each with the units nested in it, and every unit in backward order; the root first in
    both (without it, the final norm is a unit after the blocks)."""
    joined = () if s.tied_embeddings else joining_root(model, s, fsdp, record)
    own = [
        m
        for m in (s.embedding, s.lm_head)
        if m is not None and not s.tied_embeddings and not any(m is j for j in joined)
    ]
    embedding = [m for m in own if m is s.embedding]
    lm_head = [m for m in own if m is s.lm_head]
    root = [model] if fsdp.wrap_root else []
    norm = [s.final_norm] if not fsdp.wrap_root and s.final_norm is not None else []
    groups: list[tuple[nn.Module, list[nn.Module]]] = []
    for group in block_groups(model, s, fsdp, record):
        inner = [m for b in group for m in reversed(nested_units(b, fsdp, record))]
        groups.append((group[0].module, inner))  # nested: router, then experts, per block
    forward: list[tuple[nn.Module, list[nn.Module]]] = [(m, []) for m in (*root, *embedding)]
    forward += groups
    forward += [(m, []) for m in (*norm, *lm_head)]
    backward = [*root, *lm_head, *norm]
    for unit, inner in reversed(groups):
        backward += [unit, *reversed(inner)]
    return forward, [*backward, *embedding]


def set_prefetch(
    forward: list[tuple[nn.Module, list[nn.Module]]],
    backward: list[nn.Module],
    n: int,
    *,
    async_op: bool,
    root_first: bool,
) -> None:
    """Make each top-level unit prefetch its nested units and the next `n` top-level units in
    forward, each unit the next `n` units of the backward order (see the module docstring) but
    the root (`root_first`: the first unit of `backward`), which keeps FSDP2's prefetch of one;
    `async_op`: the units' all-gathers do not block the CPU (gloo)."""
    if n <= 0 or not forward:
        return
    tops = [typing.cast(FSDPModule, m) for m, _ in forward]
    for i, (_, inner) in enumerate(forward):
        nested = [typing.cast(FSDPModule, m) for m in inner]
        tops[i].set_modules_to_forward_prefetch([*nested, *tops[i + 1 : i + 1 + n]])
    back = [typing.cast(FSDPModule, m) for m in backward]
    for i, unit in enumerate(back):
        if i == 0 and root_first:
            # FSDP2 runs the root's pre-backward hook once per output tensor that gets a
            # gradient (loss, an aux loss, router logits); a later one, after the lm head's
            # backward resharded it, would gather it again with an explicit list. FSDP2's own
            # prefetch (the unit before it in post-forward order: the next in `backward`) runs
            # once per backward.
            continue
        unit.set_modules_to_backward_prefetch(back[i + 1 : i + 1 + n])
    for unit in back if async_op else ():
        unit._set_unshard_async_op(True)  # FSDP2's private setter (no public one in 2.13)
