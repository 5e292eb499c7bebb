"""`ContextParallel` on unmodified Hugging Face transformers models, through their attention registry.

transformers 5 routes every attention call through an attention-function registry
(`transformers.AttentionInterface`; each modeling file looks functions up in its module-level
`ALL_ATTENTION_FUNCTIONS` by `config._attn_implementation`). moetx registers one function there,
`"moetx_context_parallel"`, and selects it **for the parallelized model only**: the model gets its
own copy of its config (every submodule that held the old config object is pointed at the copy),
so another model built from the same config object keeps its attention. Each block's attention
module gets a parameter-free `core` child (`ContextParallelAttentionCore`) holding the cp mesh and
the comm mode; the registered function calls it with the `scaling` the model passes. The registry
is found through the attention module's own modeling module, so moetx never imports transformers.

What the HF attention paths need, and how it is met:
- **RoPE**: HF rotates q/k with `position_ids` (`rotary_emb(hidden, position_ids)`), so the global
  positions `shard_sequence` returns are all it takes; q/k norms (Qwen3) run before the function.
- **GQA**: K/V arrive with `num_key_value_heads`; the kernels expand them as `repeat_kv` does.
- **MLA** (DeepSeek-V3): V's head dim differs from Q/K's; the shorter side is zero-padded (zero
  columns change neither the scores nor the kept output columns) and the output cut back.
- **Masks**: the registered name has no mask function, so HF's mask builders return None and the
  kernels apply the causal mask by global token index. Anything else would be dropped silently,
  so the model's forward pre-hook refuses, on every rank at once (one all-reduce of flags): a
  padding `attention_mask` (all-ones masks are accepted), positions that are not one contiguous
  run per row (HF reads gaps as packed sequences and masks them), missing positions, `labels`
  without `shift_labels` (HF would shift within each rank's chunk), and a KV cache (the model's
  own config copy gets `use_cache=False`).
- **Sliding windows** (gpt-oss's `sliding_attention` layers, Mixtral's or Qwen3's
  `sliding_window`): the `sliding_window` HF passes each call becomes a per-block mask by global
  token index (HF's rule: query i sees key j when `i - window < j <= i`); blocks it empties
  are skipped.
- **Attention sinks** (gpt-oss `s_aux`): one per-head logit added to every softmax denominator,
  folded into the merged log-sum-exp, with its own gradient.
- **Router aux loss** (`output_router_logits`): reduced over the cp group (`hf_aux`).
- **Refused at check time** (`UnsupportedAttentionError`, naming the layer and the feature):
  layer types other than full and sliding attention (chunked, linear, ...), attention dropout,
  non-causal attention, and models whose attention does not go through the registry; at call
  time, a logit soft-cap.
"""

from __future__ import annotations

import copy
import inspect
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from moetx.core.errors import ContextParallelInputError, UnsupportedAttentionError
from moetx.passes.context_parallel.attention import ContextParallelAttentionCore, sequence_index
from moetx.passes.context_parallel.hf_aux import AuxLossReducer
from moetx.structure.discovery import ModelStructure

__all__ = ["HF_ATTENTION", "hf_attention_problems", "hf_context_parallel_attention", "install_hf"]

HF_ATTENTION = "moetx_context_parallel"
"""The name moetx registers in transformers' `AttentionInterface` (`config._attn_implementation`)."""


def _registry(attention: nn.Module) -> Any:
    """The `ALL_ATTENTION_FUNCTIONS` the attention module's modeling file looks functions up in."""
    registry = getattr(sys.modules.get(type(attention).__module__), "ALL_ATTENTION_FUNCTIONS", None)
    return registry if callable(getattr(registry, "register", None)) else None


_LAYER_TYPES = ("full_attention", "sliding_attention")


def _layer_feature(model: nn.Module, attention: nn.Module) -> str | None:
    """The attention feature of one HF layer that moetx's CP kernels lack, or None."""
    config = getattr(model, "config", None)
    if getattr(attention, "is_causal", True) is not True:
        return "non-causal attention (`is_causal` is not True)"
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(attention, "layer_idx", None)
    kind = (
        layer_types[layer_idx]
        if layer_types and isinstance(layer_idx, int) and layer_idx < len(layer_types)
        else "full_attention"
    )
    if kind not in _LAYER_TYPES:
        return f"a `{kind}` layer (only {' and '.join(f'`{t}`' for t in _LAYER_TYPES)} are sharded)"
    dropout = getattr(attention, "attention_dropout", 0.0) or 0.0
    if float(dropout) > 0:
        return f"attention dropout (`attention_dropout={dropout}`)"
    return None


def hf_attention_problems(model: nn.Module, structure: ModelStructure) -> list[str]:
    """One line per block whose HF attention `ContextParallel` cannot shard (empty: all fine)."""
    problems = []
    for b in structure.blocks:
        where = f"`{b.attention_fqn}` (`{type(b.attention).__name__}`) in block `{b.fqn}`"
        if not getattr(type(model), "_supports_attention_backend", False) or not _registry(
            b.attention
        ):
            problems.append(
                f"{where} cannot be made context-parallel: it does not dispatch through "
                "transformers' `AttentionInterface` (`ALL_ATTENTION_FUNCTIONS`)."
            )
            continue
        feature = _layer_feature(model, b.attention)
        if feature is not None:
            problems.append(
                f"{where} cannot be made context-parallel: it uses {feature}, which moetx's "
                "context-parallel attention does not compute."
            )
    return problems


def hf_context_parallel_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    s_aux: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: causal attention over the whole cp-sharded sequences.

    Called by HF attention modules with `query` `[B, H, S_l, D]`, `key`/`value` `[B, H_kv, S_l,
    D_k or D_v]`; returns `([B, S_l, H, D_v], None)` as `sdpa_attention_forward` does. Every
    refusal depends only on the model and the call, so it is raised on every rank alike.
    """
    core = getattr(module, "core", None)
    if not isinstance(core, ContextParallelAttentionCore):
        raise UnsupportedAttentionError(
            f"`{type(module).__name__}` was called with attention implementation "
            f"{HF_ATTENTION!r}, but `ContextParallel` did not prepare it (no cp `core` child)."
        )
    refused = {
        "an attention mask": attention_mask is not None,
        f"attention dropout ({dropout})": bool(dropout),
        "a logit soft-cap (`softcap`)": kwargs.get("softcap") is not None,
    }
    if any(refused.values()):
        raise UnsupportedAttentionError(
            f"`{type(module).__name__}` (layer {getattr(module, 'layer_idx', '?')}) was called "
            f"with {', '.join(k for k, v in refused.items() if v)}, which moetx's "
            "context-parallel attention does not compute."
        )
    d_qk, d_v = query.shape[-1], value.shape[-1]
    width = max(d_qk, d_v)
    q, k, v = (
        t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))
        for t in (query, key, value)
    )
    scale = d_qk**-0.5 if scaling is None else scaling
    out = core(q, k, v, scale=scale, window=sliding_window, sinks=s_aux)
    return out[..., :d_v].transpose(1, 2).contiguous(), None


def install_hf(
    model: nn.Module,
    structure: ModelStructure,
    mesh: DeviceMesh,
    comm: str,
    load_balance: bool,
    world: dist.ProcessGroup,
) -> Any:
    """Give every block's attention a cp `core`, select the registered function for this model
    only, hook its aux loss (`hf_aux`), and return the forward pre-hook handle guarding its
    batches."""
    for b in structure.blocks:
        _registry(b.attention).register(HF_ATTENTION, hf_context_parallel_attention)
        b.attention.core = ContextParallelAttentionCore(mesh, comm, load_balance)
    old: Any = model.config
    new: Any = copy.deepcopy(old)  # this model's own config: others built from `old` keep theirs
    for m in model.modules():
        if getattr(m, "config", None) is old:
            m.config = new
    new._attn_implementation = HF_ATTENTION
    # A KV cache would hold this rank's chunk only, and a checkpointed block's recompute would
    # append to it a second time (K/V twice as long in backward): no cache under CP.
    new.use_cache = False
    model.register_forward_hook(AuxLossReducer(model, mesh), with_kwargs=True)
    guard = _BatchGuard(model, mesh, load_balance, world)
    return model.register_forward_pre_hook(guard, with_kwargs=True)


class _BatchGuard:
    """Refuse, on every rank at once, a batch the HF model would attend to wrongly under CP."""

    _PROBLEMS = (
        "no `position_ids` (the model would number each chunk from 0)",
        "`position_ids` that are not one contiguous run per row, as `shard_sequence` makes them "
        "(HF reads gaps as packed sequences and masks them; moetx's kernels are plain causal)",
        "an `attention_mask` that masks tokens (padding is not supported under CP)",
        "`labels` without `shift_labels` (HF would shift labels within each rank's chunk)",
        "a KV cache (`cache`, `past_key_values` or `use_cache=True`): it would hold this rank's "
        "chunk only (no decoding under CP)",
    )

    def __init__(
        self, model: nn.Module, mesh: DeviceMesh, load_balance: bool, world: dist.ProcessGroup
    ) -> None:
        self.names = [n for n in inspect.signature(model.forward).parameters if n != "kwargs"]
        self.mesh, self.load_balance, self.world = mesh, load_balance, world

    def _flags(self, call: dict[str, Any]) -> list[int]:
        positions, mask = call.get("position_ids"), call.get("attention_mask")
        contiguous = positions is None or self._contiguous(positions)
        masked = mask is not None and (mask.dim() != 2 or not bool(mask.bool().all()))
        unshifted = call.get("labels") is not None and call.get("shift_labels") is None
        cached = (
            call.get("cache", call.get("past_key_values")) is not None
            or call.get("use_cache") is True
        )
        return [positions is None, not contiguous, masked, unshifted, cached]

    def _contiguous(self, positions: Tensor) -> bool:
        local = positions.shape[-1]
        if self.load_balance and local % 2:
            return True  # `InputGuard` refuses an odd length, on every rank, with its own error
        index = sequence_index(
            local, self.mesh.get_local_rank(), self.mesh.size(), self.load_balance, positions.device
        )
        rows = positions.reshape(-1, local)
        return bool(((rows - rows[:, :1]) == (index - index[0])).all())

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = {**dict(zip(self.names, args, strict=False)), **kwargs}
        ids = call.get("input_ids", call.get("inputs_embeds"))
        device = ids.device if isinstance(ids, Tensor) else None
        flags = torch.tensor(self._flags(call), dtype=torch.int64, device=device)
        dist.all_reduce(flags, group=self.world)  # every rank learns of every rank's problem
        world = dist.get_world_size(self.world)
        found = [
            f"  - {problem}: on {n} of {world} rank(s)"
            for problem, n in zip(self._PROBLEMS, flags.tolist(), strict=True)
            if n
        ]
        if found:
            raise ContextParallelInputError(
                f"`{type(module).__name__}` is context-parallel and was called with:\n"
                + "\n".join(found)
                + "\n  fix: shift labels over the whole sequences first, then "
                "`ids, shift_labels, positions = cp.shard_sequence(mesh, ids, shift_labels)` and "
                "`model(ids, labels=shift_labels, shift_labels=shift_labels, "
                "position_ids=positions)` without an `attention_mask`."
            )

    def __repr__(self) -> str:
        return f"_BatchGuard(degree={self.mesh.size()}, load_balance={self.load_balance})"
