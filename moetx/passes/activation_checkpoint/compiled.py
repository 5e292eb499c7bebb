"""What each `ActivationCheckpoint` mode saves when its block is traced by `torch.compile`.

Under the compiler no dispatch mode runs: dynamo turns `checkpoint(..., context_fn=f)` into a
`tag_activation_checkpoint` region and, while AOT autograd traces it, `f()` must return torch's
`create_selective_checkpoint_contexts(policy)`. The policy then tags each traced op save or
recompute, and the partitioner builds the backward from the tags. So every mode is a
module-level policy here, and `context_fn(mode)` is a `functools.partial` of torch's function
and that policy (dynamo accepts a plain function or a partial of constants, never a bound
method):

- `"full"`: recompute every op.
- `"router"`: save what each router computes (dtype casts, views and in-place ops excepted, as
  in eager), recompute the rest. A traced op belongs to a router when a router class is on its
  `nn_module_stack` (FX node metadata, set while AOT autograd replays the dynamo graph).
- `"selective"`: also save `SAVED_OPS` (matmuls, attention, functional collectives).

Side effects run once by construction: AOT autograd functionalizes a buffer update in forward
(the routers' load counters) into one copy at the end of the compiled forward, and a
recomputation in the compiled backward recomputes values only.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from torch.fx import traceback as fx_traceback
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from moetx.passes.activation_checkpoint.contexts import SAVED_OPS, router_saves

__all__ = ["context_fn", "register_router_class"]

# Router classes moetx checkpoints (filled by `ActivationCheckpoint.apply`); a subclass (FSDP2's
# swapped `FSDPTopKRouter`) counts too. Read only while AOT autograd traces a compiled block.
_ROUTER_CLASSES: set[type] = set()


def register_router_class(cls: type[nn.Module]) -> None:
    """Treat modules of `cls` (and subclasses) as routers in compiled `"router"`/`"selective"`."""
    _ROUTER_CLASSES.add(cls)


def _in_router() -> bool:
    meta = fx_traceback.get_current_meta() or {}
    for _, cls in (meta.get("nn_module_stack") or {}).values():
        if isinstance(cls, type) and any(issubclass(cls, r) for r in _ROUTER_CLASSES):
            return True
    return False


def _save(yes: bool) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if yes else CheckpointPolicy.PREFER_RECOMPUTE


def _full_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.PREFER_RECOMPUTE


def _router_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return _save(_in_router() and router_saves(op))


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return _save(op in SAVED_OPS or (_in_router() and router_saves(op)))


_CONTEXT_FNS: dict[str, Any] = {
    "full": functools.partial(create_selective_checkpoint_contexts, _full_policy),
    "router": functools.partial(create_selective_checkpoint_contexts, _router_policy),
    "selective": functools.partial(create_selective_checkpoint_contexts, _selective_policy),
}


def context_fn(mode: str) -> Any:
    """The `context_fn` a block checkpointed in `mode` passes to `checkpoint` when compiled."""
    return _CONTEXT_FNS[mode]
