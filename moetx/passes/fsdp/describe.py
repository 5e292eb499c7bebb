"""The FSDP units `FSDP` made of a model, in one line, for `plan` (read off the applied model)."""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule

from moetx.core.record import applied_passes, find_applied
from moetx.structure.discovery import discover

__all__ = ["describe_units"]


def describe_units(model: nn.Module) -> str | None:
    """How many units, which blocks share one (`min_unit_bytes`), which modules joined the root
    unit, and how far each prefetches; None when `FSDP` was not applied."""
    entry = find_applied(applied_passes(model), "fsdp")
    if entry is None:
        return None
    states: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, FSDPModule):
            states.setdefault(id(m._get_fsdp_state()), []).append(name)
    limit = getattr(entry.pass_, "min_unit_bytes", 0)
    shared = [f"`{n[0]}`-`{n[-1]}`" for n in states.values() if len(n) > 1]
    s = discover(model)
    joined = [
        fqn
        for fqn, m in model.named_modules()
        if m is not model
        and any(m is x for x in (s.embedding, s.lm_head))
        and not isinstance(m, FSDPModule)
        and not s.tied_embeddings
        and isinstance(model, FSDPModule)
    ]
    parts = []
    if shared:
        parts.append(f"blocks {', '.join(shared)} {'each ' if len(shared) > 1 else ''}in one unit")
    if joined:
        parts.append(f"{' and '.join(f'`{j}`' for j in joined)} join the root unit")
    why = f" (`min_unit_bytes={limit}`: {'; '.join(parts)})" if parts else ""
    n = getattr(entry.pass_, "prefetch", 0)
    what = "the next unit's all-gather" if n == 1 else f"the all-gathers of the next {n} units"
    ahead = f"; each starts {what} (`prefetch={n}`)" if n else ""
    return f"`FSDP` makes {len(states)} FSDP units{why}{ahead}."
