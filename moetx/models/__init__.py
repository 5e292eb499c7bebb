"""Synthetic MoE transformers (Qwen3-MoE / DeepSeek-V3 layout) for testing and examples."""

from moetx.models.config import MoEConfig
from moetx.models.init import init_weights_
from moetx.models.layers import Attention, CausalAttentionCore, DenseMLP, RMSNorm, RotaryEmbedding
from moetx.models.moe import (
    MoEBlock,
    RoutedExperts,
    TopKRouter,
    sequence_balance_loss,
    update_routing_bias_,
)
from moetx.models.transformer import DecoderBlock, MoEModel, MoEOutput, MoETransformer, MTPLayer

__all__ = [
    "Attention",
    "CausalAttentionCore",
    "DecoderBlock",
    "DenseMLP",
    "MTPLayer",
    "MoEBlock",
    "MoEConfig",
    "MoEModel",
    "MoEOutput",
    "MoETransformer",
    "RMSNorm",
    "RotaryEmbedding",
    "RoutedExperts",
    "TopKRouter",
    "init_weights_",
    "sequence_balance_loss",
    "update_routing_bias_",
]
