"""`MoEConfig`: the validated, frozen shape of a synthetic MoE transformer."""

from __future__ import annotations

from typing import Any

import attrs
import torch
from attrs.validators import ge, gt, in_, instance_of, optional

from moetx.core.errors import ModelConfigError

__all__ = ["DTYPES", "SCORE_FUNCS", "MoEConfig"]

SCORE_FUNCS = ("softmax", "sigmoid")
"""Router score functions, stored as plain strings so `repr(config)` is valid Python."""

DTYPES = ("float32", "bfloat16", "float16")
"""Parameter dtypes a config may name."""

_POS_INT = [instance_of(int), ge(1)]
_NONNEG_INT = [instance_of(int), ge(0)]
_BOOL = instance_of(bool)


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


@attrs.frozen(kw_only=True)
class MoEConfig:
    """Shape and options of a Qwen3-MoE / DeepSeek-V3 style decoder-only transformer.

    Defaults are tiny so a model builds and runs in milliseconds on CPU. Every field is
    validated on construction (and again by `attrs.evolve`).

    Attributes:
        vocab_size: Number of token ids.
        hidden_size: Model width H.
        num_layers: Number of backbone decoder blocks.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (GQA); must divide `num_heads`.
        head_dim: Per-head width; `None` means `hidden_size // num_heads`. Must be even (RoPE).
        num_experts: Routed experts per MoE layer.
        top_k: Experts chosen per token; at most `num_experts`.
        expert_hidden_size: Intermediate width I of one routed expert.
        num_shared_experts: Always-on experts per MoE layer (fused into one dense MLP of width
            `expert_hidden_size * num_shared_experts`); 0 disables them.
        num_dense_layers: Leading blocks that use a dense MLP instead of MoE (DeepSeek-V3).
        dense_hidden_size: Intermediate width of the dense MLPs.
        score_func: Router score function, `"softmax"` or `"sigmoid"`.
        norm_topk_prob: Renormalise the top-k weights to sum to 1.
        aux_loss_coef: Weight of the sequence-wise load-balancing loss; 0 disables it.
        routing_bias: Aux-loss-free balancing: a per-expert bias buffer used only for expert
            selection, and a per-expert token counter (see `update_routing_bias_`).
        tie_embeddings: Share `lm_head.weight` with the input embedding.
        num_mtp_layers: Multi-token-prediction depth (DeepSeek-V3); 0 disables the MTP head.
        mtp_loss_coef: Weight of the MTP loss (averaged over depths) in the total loss.
        rope_theta: RoPE base.
        rms_norm_eps: RMSNorm epsilon.
        dtype: Parameter dtype name, one of `DTYPES`.

    Example:
        >>> MoEConfig(num_experts=8, top_k=2).num_moe_layers
        2
    """

    vocab_size: int = attrs.field(default=64, validator=_POS_INT)
    hidden_size: int = attrs.field(default=16, validator=_POS_INT)
    num_layers: int = attrs.field(default=2, validator=_POS_INT)
    num_heads: int = attrs.field(default=2, validator=_POS_INT)
    num_kv_heads: int = attrs.field(default=1, validator=_POS_INT)
    head_dim: int | None = attrs.field(default=None, validator=optional([instance_of(int), ge(2)]))
    num_experts: int = attrs.field(default=4, validator=_POS_INT)
    top_k: int = attrs.field(default=2, validator=_POS_INT)
    expert_hidden_size: int = attrs.field(default=8, validator=_POS_INT)
    num_shared_experts: int = attrs.field(default=0, validator=_NONNEG_INT)
    num_dense_layers: int = attrs.field(default=0, validator=_NONNEG_INT)
    dense_hidden_size: int = attrs.field(default=32, validator=_POS_INT)
    score_func: str = attrs.field(default="softmax", validator=in_(SCORE_FUNCS))
    norm_topk_prob: bool = attrs.field(default=True, validator=_BOOL)
    aux_loss_coef: float = attrs.field(default=0.0, validator=[instance_of((int, float)), ge(0)])
    routing_bias: bool = attrs.field(default=False, validator=_BOOL)
    tie_embeddings: bool = attrs.field(default=False, validator=_BOOL)
    num_mtp_layers: int = attrs.field(default=0, validator=_NONNEG_INT)
    mtp_loss_coef: float = attrs.field(default=1.0, validator=[instance_of((int, float)), ge(0)])
    rope_theta: float = attrs.field(default=10000.0, validator=[instance_of((int, float)), gt(0)])
    rms_norm_eps: float = attrs.field(default=1e-6, validator=[instance_of((int, float)), gt(0)])
    dtype: str = attrs.field(default="float32", validator=in_(DTYPES))

    def __attrs_post_init__(self) -> None:
        problems: list[str] = []
        _check(
            problems,
            self.num_heads % self.num_kv_heads == 0,
            f"`num_kv_heads` ({self.num_kv_heads}) must divide `num_heads` ({self.num_heads}).",
        )
        _check(
            problems,
            self.top_k <= self.num_experts,
            f"`top_k` ({self.top_k}) must be at most `num_experts` ({self.num_experts}).",
        )
        _check(
            problems,
            self.num_dense_layers <= self.num_layers,
            f"`num_dense_layers` ({self.num_dense_layers}) must be at most "
            f"`num_layers` ({self.num_layers}).",
        )
        if self.head_dim is None:
            _check(
                problems,
                self.hidden_size % self.num_heads == 0,
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_heads` "
                f"({self.num_heads}) when `head_dim` is None.",
            )
        _check(
            problems,
            self.attention_head_dim % 2 == 0,
            f"`head_dim` ({self.attention_head_dim}) must be even for rotary embeddings.",
        )
        if problems:
            raise ModelConfigError("\n".join(problems))

    @property
    def attention_head_dim(self) -> int:
        """The per-head width actually used (`head_dim`, or `hidden_size // num_heads`)."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def num_moe_layers(self) -> int:
        """Backbone blocks that carry a routed-MoE MLP."""
        return self.num_layers - self.num_dense_layers

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a `torch.dtype`."""
        dtype = getattr(torch, self.dtype)
        assert isinstance(dtype, torch.dtype)
        return dtype

    @classmethod
    def deepseek_v3_shaped(cls, **overrides: Any) -> MoEConfig:
        """Return a config with DeepSeek-V3's shape (~685B parameters with the MTP layer).

        Attention is GQA (128 query heads, 8 KV heads, head_dim 128) rather than MLA, so the
        count is close to, not equal to, DeepSeek-V3's. Build it only on the `meta` device.

        Args:
            **overrides: Fields to change, e.g. `num_layers=4` for a shallow variant.
        """
        fields: dict[str, Any] = {
            "vocab_size": 129280,
            "hidden_size": 7168,
            "num_layers": 61,
            "num_heads": 128,
            "num_kv_heads": 8,
            "head_dim": 128,
            "num_experts": 256,
            "top_k": 8,
            "expert_hidden_size": 2048,
            "num_shared_experts": 1,
            "num_dense_layers": 3,
            "dense_hidden_size": 18432,
            "score_func": "sigmoid",
            "norm_topk_prob": True,
            "routing_bias": True,
            "num_mtp_layers": 1,
            "mtp_loss_coef": 0.3,
            "dtype": "bfloat16",
        }
        fields.update(overrides)
        return cls(**fields)
