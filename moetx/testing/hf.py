"""Tiny, randomly initialised Hugging Face transformers MoE models, built from config objects.

Nothing is downloaded: each family's config class is filled with toy sizes (hidden 16, 4
experts, 2 per token, 2 layers) and its `...ForCausalLM` class is built under a fixed seed, so
every rank and the single-process reference build bitwise the same model. The parity pattern is
`moetx.testing.train`'s: the reference trains on the global batch, each rank on its rows.

Loss: HF's causal-LM loss with `labels=input_ids` (HF shifts labels internally, so every row has
`seq_len - 1` targets and every rank the same number: the mean of the rank losses is the global
loss). The router aux loss is off (`output_router_logits=False`, HF's default): HF computes it
over the whole batch (`load_balancing_loss_func`, a product of batch means), which is not a sum
over rows, so per-rank aux losses would not average to the global one.

Requires `transformers>=5` (the `hf` extra): imported on first use, not at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import attrs
import torch

from moetx.testing.train import train

__all__ = [
    "FAMILIES",
    "PRELOAD",
    "HFSpec",
    "build_model",
    "global_batches",
    "model_class",
    "reference",
    "tiny_config",
]

#: family -> (transformers config class, causal-LM class, config fields of the tiny model).
_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "moe_intermediate_size": 8, "intermediate_size": 16, "head_dim": 8},
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "intermediate_size": 8, "head_dim": 8},
    ),
    # Shared experts, a leading dense layer, grouped (n_group / topk_group) sigmoid routing, MLA.
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 2,
            "topk_group": 1,
            "moe_intermediate_size": 8,
            "intermediate_size": 16,
            "q_lora_rank": 8,
            "kv_lora_rank": 8,
            "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 4,
            "v_head_dim": 8,
            "num_hidden_layers": 3,
        },
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "intermediate_size": 8}),
    # Experts with biases and a transposed [E, H, 2I] layout; attention sinks (eager attention).
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {
            "num_local_experts": 4,
            "intermediate_size": 8,
            "head_dim": 8,
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 4,
        },
    ),
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
"""Families `tiny_config` can build (`model_type` names)."""

PRELOAD: tuple[str, ...] = (
    "transformers",
    *(f"transformers.models.{family}.modeling_{family}" for family in FAMILIES),
    "moetx.testing.hf",
)
"""Modules worth importing once in the rank forkserver (`moetx.testing.ranks.PRELOAD`) when HF
tests run: otherwise every fresh rank imports transformers itself (seconds per rank)."""

_COMMON: dict[str, Any] = {
    "vocab_size": 32,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    # Larger than HF's 0.02, so routing is decisive (no near-ties that rounding could flip
    # between a rank's rows and the global batch) and every gradient is well above atol.
    "initializer_range": 0.2,
    "use_cache": False,
    "tie_word_embeddings": False,
    "output_router_logits": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": None,
}


def _transformers() -> Any:
    return importlib.import_module("transformers")


def tiny_config(family: str, **overrides: Any) -> Any:
    """A tiny config of `family` (see `FAMILIES`); `overrides` replace any field.

    `attn_implementation` defaults to `"sdpa"` (`"eager"` for gpt_oss, whose attention sinks
    SDPA lacks); `experts_implementation` is left to transformers (`"grouped_mm"`) unless given.
    """
    if family not in _FAMILIES:
        raise ValueError(f"`family` must be one of {FAMILIES} (got {family!r}).")
    config_name, _, fields = _FAMILIES[family]
    kwargs = {
        **_COMMON,
        "attn_implementation": "eager" if family == "gpt_oss" else "sdpa",
        **fields,
        **overrides,
    }
    return getattr(_transformers(), config_name)(**kwargs)


def model_class(family: str) -> Any:
    """The `...ForCausalLM` class of `family` (a `transformers.PreTrainedModel` subclass)."""
    return getattr(_transformers(), _FAMILIES[family][1])


def _pairs(value: Iterable[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    return tuple((str(k), v) for k, v in value)


@attrs.frozen(kw_only=True)
class HFSpec:
    """Everything both sides need to build the same HF model and the same data.

    Attributes:
        family: One of `FAMILIES`.
        overrides: Config fields replacing the tiny defaults, as `(name, value)` pairs (a tuple,
            so the spec stays hashable and picklable).
        seed: Seeds the model's init (`torch.manual_seed`) and, plus one, the data.
        steps: AdamW steps.
        rows_per_rank: Rows of the global batch each data rank trains on.
        seq_len: Tokens per row.
        lr: AdamW learning rate (smaller than `TrainSpec`'s: see the field's comment).
    """

    family: str = attrs.field(validator=attrs.validators.in_(FAMILIES))
    overrides: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_pairs)
    seed: int = 0
    steps: int = 3
    rows_per_rank: int = 2
    seq_len: int = 8
    # AdamW's first step moves every element by about `lr` whatever its gradient, so a
    # gradient within float noise of 0 (|g| ~ eps) can move by a visibly different amount
    # on ranks and in the reference; 1e-3 keeps that below the parameter tolerance.
    lr: float = 1e-3

    def config(self) -> Any:
        """The family's tiny config with this spec's overrides."""
        return tiny_config(self.family, **dict(self.overrides))


def build_model(spec: HFSpec) -> Any:
    """The spec's `...ForCausalLM`, initialised by transformers under `torch.manual_seed(seed)`.

    Typed `Any`: it is a `transformers.PreTrainedModel` (an `nn.Module`), which this module
    does not import at import time.
    """
    config = spec.config()
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        return model_class(spec.family)(config)


def global_batches(spec: HFSpec, data_ranks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` global batches of `data_ranks * rows_per_rank` rows: `(input_ids, labels)`.

    Labels are the input ids themselves: HF's causal-LM loss shifts them.
    """
    vocab = int(spec.config().vocab_size)
    g = torch.Generator().manual_seed(spec.seed + 1)
    out = []
    for _ in range(spec.steps):
        ids = torch.randint(0, vocab, (data_ranks * spec.rows_per_rank, spec.seq_len), generator=g)
        out.append((ids, ids.clone()))
    return out


def reference(spec: HFSpec, data_ranks: int) -> dict[str, Any]:
    """Single-process AdamW training of the unparallelized model on the global batches."""
    return train(build_model(spec), global_batches(spec, data_ranks), spec.lr)
