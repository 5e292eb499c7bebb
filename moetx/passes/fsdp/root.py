"""`FSDP(wrap_root=False)`: refuse a first forward that no caller-made FSDP root will initialise.

FSDP2 initialises its units lazily, from the *root*: the first unit to run forward initialises
every unit below it (shared communication context, FQNs, prefetch targets). Without the root
unit, moetx's units are all tops of their own trees, so the first one called (the embedding)
becomes a root of itself alone and FSDP2 fails inside torch: prefetching the next unit finds
its communication context uninitialised (`'FSDPCommContext' object has no attribute
'device_handle'`), and a unit of several blocks cannot be a root at all ("FSDP requires a single
root module"). Whatever the other passes (TP, EP, CP alike). With a module above the model made
the root by the caller (`fully_shard(outer)`), the units train like one process
(tests/test_fsdp.py). Which the caller will do is unknown when `FSDP` applies, so the check runs
at the first forward, before any FSDP hook of the model's units, and then removes itself.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.fsdp import FSDPModule

from moetx.core.errors import FSDPRootError

__all__ = ["require_callers_root"]


def require_callers_root(model: nn.Module) -> None:
    """Make `model`'s first forward raise `FSDPRootError` unless an FSDP root above it has
    initialised its units by then."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    handle: Any = None

    def check(module: nn.Module, args: Any) -> None:
        # an FSDP root initialises the units below it in its own pre-forward, before this one
        if any(u._get_fsdp_state()._is_root is None for u in units):
            raise FSDPRootError(
                f"`FSDP(wrap_root=False)`: `{type(module).__name__}` was called with no FSDP "
                "root above its units, so FSDP2 cannot initialise them (it would fail in torch "
                "at this first forward).\n"
                "  fix: keep `wrap_root=True` (the default), or call `fully_shard` on the module "
                "that calls this model before its first forward."
            )
        handle.remove()

    handle = model.register_forward_pre_hook(check)
