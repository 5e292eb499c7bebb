"""Decoder block, backbone, MTP head and `MoETransformer`, named like HF transformers 5 MoE models."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moetx.models.config import MoEConfig
from moetx.models.init import init_weights_
from moetx.models.layers import Attention, DenseMLP, RMSNorm, RotaryEmbedding
from moetx.models.moe import MoEBlock

__all__ = ["DecoderBlock", "MTPLayer", "MoEModel", "MoEOutput", "MoETransformer"]

IGNORE_INDEX = -100
"""Label value for positions without a target (as in `F.cross_entropy`)."""

PositionEmbeddings = tuple[torch.Tensor, torch.Tensor]


class MoEOutput(NamedTuple):
    """What `MoETransformer.forward` returns.

    Attributes:
        logits: `[B, S, vocab]` next-token logits.
        loss: Scalar training loss, or `None` without labels.
        aux_loss: Float32 scalar: sum of every MoE layer's weighted balance loss.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor


def _moe_block(config: MoEConfig) -> MoEBlock:
    return MoEBlock(
        config.hidden_size,
        config.num_experts,
        config.top_k,
        config.expert_hidden_size,
        num_shared_experts=config.num_shared_experts,
        score_func=config.score_func,
        norm_topk_prob=config.norm_topk_prob,
        routing_bias=config.routing_bias,
        aux_loss_coef=config.aux_loss_coef,
        dtype=config.torch_dtype,
    )


class DecoderBlock(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.

    Args:
        config: Model config.
        moe: Use a routed `MoEBlock` as `mlp` (else a `DenseMLP` of `dense_hidden_size`).
    """

    def __init__(self, config: MoEConfig, *, moe: bool):
        super().__init__()
        dtype, h = config.torch_dtype, config.hidden_size
        self.is_moe = moe
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(
            h, config.num_heads, config.num_kv_heads, config.attention_head_dim, dtype=dtype
        )
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps, dtype=dtype)
        self.mlp: nn.Module = (
            _moe_block(config) if moe else DenseMLP(h, config.dense_hidden_size, dtype=dtype)
        )

    def forward(
        self, hidden: torch.Tensor, position_embeddings: PositionEmbeddings
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(hidden [B, S, H], aux_loss float32 scalar)` (aux is 0 on dense blocks)."""
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), position_embeddings)
        normed = self.post_attention_layernorm(hidden)
        if self.is_moe:
            out, aux = self.mlp(normed)
        else:
            out, aux = self.mlp(normed), torch.zeros((), device=hidden.device)
        return hidden + out, aux


class MoEModel(nn.Module):
    """The backbone: embedding, decoder blocks (dense first, then MoE), final norm."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, dtype=config.torch_dtype
        )
        self.layers = nn.ModuleList(
            DecoderBlock(config, moe=i >= config.num_dense_layers) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=config.torch_dtype)
        self.rotary_emb = RotaryEmbedding(config.attention_head_dim, config.rope_theta)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, PositionEmbeddings]:
        """Return `(normed hidden [B, S, H], aux_loss, (cos, sin))` for `input_ids` `[B, S]`."""
        hidden = self.embed_tokens(input_ids)
        position_embeddings = self.rotary_emb(position_ids)
        aux = torch.zeros((), device=hidden.device)
        for layer in self.layers:
            hidden, layer_aux = layer(hidden, position_embeddings)
            aux = aux + layer_aux
        return self.norm(hidden), aux, position_embeddings


class MTPLayer(nn.Module):
    """One DeepSeek-V3 multi-token-prediction depth.

    Depth d combines the previous depth's hidden state at position t with the embedding of
    token t+d and predicts token t+d+1:
    `block(eh_proj(cat(enorm(emb), hnorm(h))))`, then `norm` before the shared `lm_head`.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        dtype, h, eps = config.torch_dtype, config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(h, eps, dtype=dtype)
        self.hnorm = RMSNorm(h, eps, dtype=dtype)
        self.eh_proj = nn.Linear(2 * h, h, bias=False, dtype=dtype)
        self.block = DecoderBlock(config, moe=True)
        self.norm = RMSNorm(h, eps, dtype=dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        token_embeds: torch.Tensor,
        position_embeddings: PositionEmbeddings,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return `(hidden for the next depth, normed hidden for lm_head, aux_loss)`."""
        mixed = self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(hidden)], dim=-1))
        hidden, aux = self.block(mixed, position_embeddings)
        return hidden, self.norm(hidden), aux


def _shift_left(labels: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return labels
    pad = labels.new_full((labels.shape[0], n), IGNORE_INDEX)
    return torch.cat([labels[:, n:], pad], dim=1)


class MoETransformer(nn.Module):
    """A decoder-only MoE language model (Qwen3-MoE / DeepSeek-V3 layout).

    Modules: `model` (the `MoEModel` backbone), `lm_head`, and `mtp` (an `nn.ModuleList` of
    `MTPLayer`, only when `config.num_mtp_layers > 0`).

    Built on a real device, parameters are set by `init_weights_(self, seed=0)`, so two
    builds of one config are identical whatever the global RNG. Built on `meta`, call
    `to_empty(...)` and then `init_weights_(model, seed)` (which re-ties tied embeddings).

    Args:
        config: The model shape and options.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.model = MoEModel(config)
        self.lm_head = nn.Linear(
            config.hidden_size, config.vocab_size, bias=False, dtype=config.torch_dtype
        )
        self.mtp: nn.ModuleList | None = None
        if config.num_mtp_layers:
            self.mtp = nn.ModuleList(MTPLayer(config) for _ in range(config.num_mtp_layers))
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            init_weights_(self, seed=0)

    def get_input_embeddings(self) -> nn.Embedding:
        """Return the token embedding (HF convention)."""
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        """Return the output projection (HF convention)."""
        return self.lm_head

    def tie_weights(self) -> None:
        """Share `lm_head.weight` with the embedding when `config.tie_embeddings`.

        `to_empty` creates new parameter objects and so unties them; `init_weights_` calls
        this again.
        """
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> MoEOutput:
        """Run the model.

        Args:
            input_ids: `[B, S]` token ids.
            labels: `[B, S]` targets already aligned with positions: `labels[b, s]` is the
                token to predict at position s (the caller shifts), `IGNORE_INDEX` (-100)
                where there is none. Because labels are position-aligned, a batch can be
                split along the sequence. The MTP head at depth d needs the embedding of
                token s+d, which it reads from `labels` shifted by d-1, and predicts `labels`
                shifted by d (positions past the end are ignored). The MTP head runs only
                when labels are given.
            position_ids: `[B, S]` or `[S]` global positions; default `arange(S)`.

        Returns:
            `MoEOutput(logits, loss, aux_loss)`, where `loss` is the mean cross-entropy over
            targeted positions + `aux_loss` + `mtp_loss_coef` * (MTP cross-entropy averaged
            over depths).
        """
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(b, s)
        hidden, aux, position_embeddings = self.model(input_ids, position_ids)
        logits = self.lm_head(hidden)
        if labels is None:
            return MoEOutput(logits, None, aux)
        loss = _cross_entropy(logits, labels)
        if self.mtp is not None:
            mtp_loss = torch.zeros((), device=hidden.device)
            mtp_hidden = hidden
            for depth, layer in enumerate(self.mtp, start=1):
                next_tokens = _shift_left(labels, depth - 1).clamp_min(0)
                embeds = self.model.embed_tokens(next_tokens)
                mtp_hidden, normed, layer_aux = layer(mtp_hidden, embeds, position_embeddings)
                aux = aux + layer_aux
                mtp_loss = mtp_loss + _cross_entropy(
                    self.lm_head(normed), _shift_left(labels, depth)
                )
            loss = loss + self.config.mtp_loss_coef * mtp_loss / len(self.mtp)
        return MoEOutput(logits, loss + aux, aux)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
