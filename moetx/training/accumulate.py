"""Gradient accumulation: skip the gradient reduction on all but the last micro-batch.

    for i, (ids, labels) in enumerate(micro_batches):
        with no_sync(model, enabled=i < len(micro_batches) - 1):
            (model(ids, labels=labels).loss / len(micro_batches)).backward()
    opt.step()

Inside `no_sync`, FSDP2 keeps the unsharded gradients and adds the next backward's to them; the
first backward outside reduces the sum once (with every unit's divide factor, so expert
gradients keep their global-mean scale). Scaling each micro-batch loss by 1/micro-batches makes
the step equal one step on the concatenated batch (equal tokens per micro-batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

from torch import nn
from torch.distributed.fsdp import FSDPModule

__all__ = ["no_sync"]

_DEPTH_ATTR = "_moetx_no_sync_depth"


@contextlib.contextmanager
def no_sync(model: nn.Module, *, enabled: bool = True) -> Iterator[None]:
    """Within the block, backward passes accumulate gradients without communicating.

    Works whether or not FSDP was applied: it switches off gradient reduction on every FSDP2
    unit in `model` (`FSDPModule.set_requires_gradient_sync(False)`) and switches it back on
    when the outermost `no_sync` exits. A model without FSDP units (one process, or expert
    parallelism alone) accumulates in `.grad` anyway, so the block changes nothing there.
    Gradients are only complete after a backward *outside* the block: run the last micro-batch
    outside, then step. Memory: each unit keeps its unsharded gradients until then.

    Args:
        model: The (possibly FSDP-wrapped) model.
        enabled: `False` makes the block a no-op, for `enabled=i < n - 1` in a loop.

    Example:
        >>> with no_sync(model):  # doctest: +SKIP
        ...     (model(ids0, labels=y0).loss / 2).backward()
        >>> (model(ids1, labels=y1).loss / 2).backward()  # doctest: +SKIP
    """
    if not enabled:
        yield
        return
    units = [cast(FSDPModule, m) for m in model.modules() if isinstance(m, FSDPModule)]
    depth = model.__dict__.get(_DEPTH_ATTR, 0)
    if depth == 0:
        for unit in units:
            unit.set_requires_gradient_sync(False, recurse=False)
    model.__dict__[_DEPTH_ATTR] = depth + 1
    try:
        yield
    finally:
        model.__dict__[_DEPTH_ATTR] = depth
        if depth == 0:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)
