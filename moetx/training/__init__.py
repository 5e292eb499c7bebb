"""Layer 5, training-loop helpers: data and loss for any layout, gradient sync, clipping,
accumulation and DCP checkpoints."""

from moetx.training.accumulate import no_sync
from moetx.training.checkpoint import full_state_dict, load_checkpoint, save_checkpoint
from moetx.training.clip import clip_grad_norm_, grad_norm
from moetx.training.data import IGNORE_INDEX, RankBatch, data_sampler, shard_batch, shift_labels
from moetx.training.grad_sync import sync_gradients
from moetx.training.loss import TokenCount, count_tokens, token_mean_loss

__all__ = [
    "IGNORE_INDEX",
    "RankBatch",
    "TokenCount",
    "clip_grad_norm_",
    "count_tokens",
    "data_sampler",
    "full_state_dict",
    "grad_norm",
    "load_checkpoint",
    "no_sync",
    "save_checkpoint",
    "shard_batch",
    "shift_labels",
    "sync_gradients",
    "token_mean_loss",
]
