"""`ActivationCheckpoint`: the pass (`api`), its recompute contexts (`contexts`) and saved-output caches (`saved`)."""

from moetx.passes.activation_checkpoint.api import (
    MODES,
    SAVED_OPS,
    ActivationCheckpoint,
    is_checkpointed,
    side_effect_buffers,
)

__all__ = ["MODES", "SAVED_OPS", "ActivationCheckpoint", "is_checkpointed", "side_effect_buffers"]
