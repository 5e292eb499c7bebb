"""`FSDP`: FSDP2 `fully_shard` units for MoE models (`api`)."""

from moetx.passes.fsdp.api import FSDP

__all__ = ["FSDP"]
