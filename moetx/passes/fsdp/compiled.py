"""FSDP units nested in a compiled block, driven from the block's hooks so it compiles whole.

FSDP2 puts each unit's work (all-gather before forward, reshard after it, the backward hooks)
in module hooks that are `torch._dynamo.disable`d: a unit called *inside* a compiled block (the
routed experts on the expert mesh, an fp32 router) is a graph break there, and `fullgraph=True`
fails. FSDP2 cannot merge those parameters into the block's unit (another mesh, another
dtype), so with `Compile` in the record, `FSDP` keeps them their own units and moves the work
*around* the compiled region instead:

- the nested unit's own forward hooks are removed;
- the block's pre-forward hook (after FSDP's for the block) runs the unit's `_pre_forward`:
  the unit is all-gathered before the block's compiled forward starts, and its post-backward
  (reduce-scatter) is tied to the block's inputs, so it runs once the block's backward is done;
- the block's forward hook runs the unit's `_post_forward` on the block's output: reshard after
  forward, and the pre-backward all-gather when backward reaches the block.

Collectives per unit and step are the same as with the hooks on the unit; only their place
moves from the unit's call to the block's. An fp32 router's input cast (FSDP2's
`cast_forward_inputs`, which would now apply to the block's inputs) becomes a plain forward
pre-hook on the router, which the compiler traces. Without `Compile`, none of this runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

__all__ = ["drive_nested_units"]


def _state(unit: nn.Module) -> Any:
    assert isinstance(unit, FSDPModule)
    return unit._get_fsdp_state()


def drive_nested_units(block: nn.Module) -> None:
    """Run the FSDP2 forward hooks of every unit nested in `block` from `block`'s own hooks.

    `block` and its nested units are already `fully_shard`-ed. A nested unit whose compute
    dtype differs from the block's (an fp32 router under `param_dtype="bfloat16"`) gets its
    input cast from a traceable hook on itself instead of FSDP2's (which would now cast the
    block's inputs).
    """
    dtype = _state(block)._mp_policy.param_dtype
    for unit in block.modules():
        if unit is not block and isinstance(unit, FSDPModule):
            own = _state(unit)._mp_policy.param_dtype
            _drive(block, unit, cast_to=own if own is not None and own != dtype else None)


def _drive(block: nn.Module, unit: nn.Module, *, cast_to: torch.dtype | None) -> None:
    state = _state(unit)
    state._pre_forward_hook_handle.remove()
    state._post_forward_hook_handle.remove()

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if cast_to is not None:  # the block's inputs must keep their dtype
            state._pre_forward(unit, (), {})
            return None
        return state._pre_forward(unit, args, kwargs)

    def post(module: nn.Module, args: Any, output: Any) -> Any:
        return state._post_forward(unit, args, output)

    block.register_forward_pre_hook(pre, with_kwargs=True)
    block.register_forward_hook(post, prepend=True)  # before the block's own post-forward
    if cast_to is not None:
        unit.register_forward_pre_hook(_caster(cast_to), with_kwargs=True)


def _caster(dtype: torch.dtype) -> Any:
    def cast(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        def one(x: Any) -> Any:
            return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}

    return cast
