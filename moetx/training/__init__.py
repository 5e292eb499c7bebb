"""Layer 5, training-loop helpers: global gradient clipping, accumulation, DCP checkpoints."""

from moetx.training.accumulate import no_sync
from moetx.training.checkpoint import full_state_dict, load_checkpoint, save_checkpoint
from moetx.training.clip import clip_grad_norm_, grad_norm

__all__ = [
    "clip_grad_norm_",
    "full_state_dict",
    "grad_norm",
    "load_checkpoint",
    "no_sync",
    "save_checkpoint",
]
