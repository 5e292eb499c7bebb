"""Local shards of a module's DTensor parameters, read once per compiled block call if asked.

`ExpertParallel` runs the experts' own forward on this rank's expert shards (`DTensor.to_local`).
Under `torch.compile` with activation checkpointing, a `to_local` inside the checkpointed region
makes each DTensor (and its `DeviceMesh`, an opaque graph input) an input of the checkpoint's
higher-order op; torch 2.13's partitioner then saves that mesh for backward next to the RNG state
of the block's attention (`functionalize_rng_ops` counts saved symints but not opaque objects), and
the compiled forward fails at run time ("expected all tensors_saved_with_vc_check to be Tensors").
So a checkpointing pass that is being compiled calls `hoist` on every `LocalShards` of the block
just before `checkpoint` and `drop` right after: the `to_local` calls run outside the region, and
the region reads plain tensors. Eager, nothing is hoisted and `tensors` calls `to_local` itself.
"""

from __future__ import annotations

from torch import Tensor, nn

from moetx.structure.tensors import to_local

__all__ = ["LocalShards", "attach_local_shards", "local_shards"]

_ATTR = "_moetx_local_shards"


class LocalShards:
    """This rank's shards of the parameters `names` of `module`, as its forward reads them."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]) -> None:
        self.module = module
        self.names = names
        self.hoisted: dict[str, Tensor] | None = None

    def tensors(self) -> dict[str, Tensor]:
        """The local shards: the hoisted ones while hoisted, else `to_local` of each now."""
        if self.hoisted is not None:
            return self.hoisted
        return {name: to_local(getattr(self.module, name)) for name in self.names}

    def hoist(self) -> None:
        """Read the shards now (outside a checkpointed region), until `drop`."""
        self.hoisted = {name: to_local(getattr(self.module, name)) for name in self.names}

    def drop(self) -> None:
        """Forget the hoisted shards (no tensor outlives the call)."""
        self.hoisted = None


def attach_local_shards(module: nn.Module, names: tuple[str, ...]) -> LocalShards:
    """Give `module` a `LocalShards` of its parameters `names` (found by `local_shards`)."""
    shards = LocalShards(module, names)
    module.__dict__[_ATTR] = shards
    return shards


def local_shards(root: nn.Module) -> tuple[LocalShards, ...]:
    """Every `LocalShards` attached to `root` or a module under it."""
    return tuple(m.__dict__[_ATTR] for m in root.modules() if _ATTR in m.__dict__)
