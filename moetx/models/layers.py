"""Dense building blocks of the synthetic MoE transformer: norm, RoPE, attention, dense MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "CausalAttentionCore",
    "DenseMLP",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 and cast back to the input dtype.

    Args:
        hidden_size: Width of the normalised (last) dim.
        eps: Added to the mean square before the reciprocal square root.
        dtype: Dtype of the `weight` parameter.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise `x` over its last dim and scale by `weight`."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Parameter-free RoPE table: maps global positions to `(cos, sin)`.

    The inverse frequencies are recomputed on every call (cheap), so there is no buffer to
    survive a `meta` build and `to_empty`.

    Args:
        head_dim: Per-head width D (even).
        theta: RoPE base.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return float32 `(cos, sin)`, each `[*position_ids.shape, head_dim]`.

        Args:
            position_ids: Integer global positions, any shape (usually `[B, S]`).
        """
        exponent = torch.arange(0, self.head_dim, 2, device=position_ids.device) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponent.double())
        angles = position_ids.double().unsqueeze(-1) * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().float(), angles.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, heads, S, D]` by `cos`/`sin` `[B, S, D]` (HF "rotate_half" layout)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


class CausalAttentionCore(nn.Module):
    """The attention kernel: causal softmax attention with grouped KV heads, no parameters.

    This is the seam for context parallelism: a CP pass replaces `Attention.core` with a
    module of the same interface that attends over a sequence-sharded `q`/`k`/`v`. The core
    sees only per-head tensors after RoPE (which used global positions), so a replacement
    needs no other state.

    Attributes:
        is_causal: Declares the core causal; context parallelism shards only cores that say so.
    """

    is_causal: bool = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attend causally.

        Args:
            q: Queries `[B, num_heads, S, D]`.
            k: Keys `[B, num_kv_heads, S, D]`; `num_kv_heads` divides `num_heads`.
            v: Values, same shape as `k`.

        Returns:
            `[B, num_heads, S, D]`.
        """
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class Attention(nn.Module):
    """Multi-head attention with GQA and RoPE; the kernel is the swappable `core` child.

    Args:
        hidden_size: Model width H.
        num_heads: Query heads.
        num_kv_heads: Key/value heads; divides `num_heads`.
        head_dim: Per-head width D.
        dtype: Parameter dtype.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False, dtype=dtype)
        self.core: nn.Module = CausalAttentionCore()

    def forward(
        self, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Project, rotate, attend and project back.

        Args:
            hidden: `[B, S, H]`.
            position_embeddings: `(cos, sin)` from `RotaryEmbedding`, each `[B, S, D]`.

        Returns:
            `[B, S, H]`.
        """
        b, s, _ = hidden.shape
        q = self.q_proj(hidden).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.core(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class DenseMLP(nn.Module):
    """SiLU-gated MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))`.

    Args:
        hidden_size: Model width H.
        intermediate_size: Inner width.
        dtype: Parameter dtype.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to `x` `[..., H]`."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
