"""Routed-MoE layer: deterministic top-k router, stacked experts, sequence-wise aux loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moetx.models.layers import DenseMLP
from moetx.models.ops import count_load_, grouped_swiglu, swiglu_loop
from moetx.structure.tensors import to_local

__all__ = [
    "MoEBlock",
    "RoutedExperts",
    "StatsReducer",
    "TopKRouter",
    "sequence_balance_loss",
    "update_routing_bias_",
]


class TopKRouter(nn.Module):
    """Score experts per token and pick the top k, deterministically.

    Logits are computed in float32. Ties are broken towards the lower expert index (a stable
    descending sort, not `torch.topk`, whose tie order is unspecified), so a recomputation
    under activation checkpointing picks the same experts.

    With `routing_bias`, the buffer `e_score_correction_bias` [E] is added to the scores for
    *selection only* (DeepSeek-V3 aux-loss-free balancing); the returned weights come from the
    unbiased scores. Tokens per expert are then counted into the buffer `expert_load` [E]
    (int64) by `_count_load`, the forward's only side effect.

    Args:
        hidden_size: Model width H.
        num_experts: Number of routed experts E.
        top_k: Experts per token k.
        score_func: `"softmax"` or `"sigmoid"`.
        norm_topk_prob: Renormalise the k weights of each token to sum to 1.
        routing_bias: Add the selection bias and the load counter buffers.
        dtype: Dtype of `weight`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: str = "softmax",
        norm_topk_prob: bool = True,
        routing_bias: bool = False,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"`score_func` ({score_func!r}) must be 'softmax' or 'sigmoid'.")
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)
        self.e_score_correction_bias: torch.Tensor | None
        self.expert_load: torch.Tensor | None
        if routing_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
            self.register_buffer(
                "expert_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False
            )
        else:
            self.e_score_correction_bias = None
            self.expert_load = None

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens.

        Args:
            hidden: Flat tokens `[T, H]`.

        Returns:
            `(top_k_index [T, k] int64, top_k_weights [T, k] in hidden's dtype,
            scores [T, E] float32)`.
        """
        logits = F.linear(hidden.float(), self.weight.float())
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        selection = scores.detach()
        if self.e_score_correction_bias is not None:
            selection = selection + self.e_score_correction_bias.float()
        order = torch.sort(selection, dim=-1, descending=True, stable=True).indices
        top_k_index = order[:, : self.top_k].contiguous()
        top_k_weights = scores.gather(-1, top_k_index)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / (top_k_weights.sum(-1, keepdim=True) + 1e-20)
        if self.expert_load is not None:
            if torch.compiler.is_compiling():
                count_load_(self.expert_load, top_k_index)  # same guard, checked at run time
            else:
                self._count_load(top_k_index)
        return top_k_index, top_k_weights.to(hidden.dtype), scores

    def _count_load(self, top_k_index: torch.Tensor) -> None:
        """Add this call's tokens per expert to `expert_load` (`bincount`, never `histc`).

        This is the only state the forward mutates. Activation checkpointing replays the
        forward during backward; a replay must not count again, so calls made while autograd
        is running a backward pass (which is where every checkpoint recomputation happens,
        reentrant or not) are skipped. An AC pass that recomputes elsewhere must guard this
        method itself. Under `torch.compile` the forward calls the op `moetx.models.ops.count_load_`
        instead, which makes the same check when the compiled graph runs.
        """
        if torch._C._current_graph_task_id() != -1:
            return
        assert self.expert_load is not None
        with torch.no_grad():
            counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts)
            self.expert_load.add_(counts[: self.num_experts])


class RoutedExperts(nn.Module):
    """E SiLU-gated experts with stacked weights, computed as a grouped matmul.

    The experts contract (HF transformers 5 MoE experts): `forward(hidden [T, H],
    top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`, with stacked parameters
    `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]. The forward reads E from
    `gate_up_proj.shape[0]` (the local shard when the parameter is a DTensor), so expert
    parallelism can call it with a shard of the experts and local expert ids.
    `num_experts` is for introspection only.

    Args:
        num_experts: E.
        hidden_size: H.
        intermediate_size: I.
        dtype: Parameter dtype.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype)
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype)
        )
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Sum each token's k expert outputs, weighted.

        Every expert runs, even on zero tokens, so each gets a zero (not `None`) gradient.
        Eagerly this is a loop of matmuls over `split` rows; under `torch.compile` it is the opaque
        op `moetx.models.ops.grouped_swiglu` (the same loop, static shapes for the compiler).
        """
        # Expert parallelism stores global-shape DTensors sharded on dim 0; compute on the local
        # shard with local expert ids (torchtitan's GroupedExperts does the same).
        gate_up, down = to_local(self.gate_up_proj), to_local(self.down_proj)
        num_experts = gate_up.shape[0]
        k = top_k_index.shape[1]
        flat_index = top_k_index.reshape(-1)
        order = torch.argsort(flat_index, stable=True)
        token_ids = order // k
        routed = hidden[token_ids]
        if torch.compiler.is_compiling():
            # One opaque op with static shapes (see `moetx.models.ops`); same forward numerics.
            counts = torch.zeros(num_experts, dtype=torch.int64, device=hidden.device)
            counts = counts.index_add(0, flat_index, torch.ones_like(flat_index))
            expert_out = grouped_swiglu(routed, counts, gate_up, down)
        else:
            counts_list = torch.bincount(flat_index, minlength=num_experts).tolist()
            expert_out = swiglu_loop(routed, counts_list, gate_up, down)
        weights = top_k_weights.reshape(-1)[order].unsqueeze(-1)
        weighted = expert_out * weights
        out = torch.zeros_like(hidden)
        return out.index_add_(0, token_ids, weighted.to(hidden.dtype))


StatsReducer = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, int]]
"""Reduces a sequence-sharded batch's aux-loss statistics over the ranks sharing the sequences.

Called as `reducer(counts [B, E] int64, prob_sums [B, E] float32, seq_len)` with this rank's
per-sequence expert-choice counts, per-sequence sums of normalised scores, and local tokens per
sequence; returns the same three for the whole sequences. The prob-sum reduction must be
autograd-aware. `moetx.passes.context_parallel.api` installs one on every `MoEBlock`.
"""


def sequence_balance_loss(
    scores: torch.Tensor,
    top_k_index: torch.Tensor,
    batch_size: int,
    stats_reducer: StatsReducer | None = None,
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over the sequences of the batch.

    For sequence b with S tokens, `L_b = sum_i f_i * P_i` where
    `f_i = E / (k * S) * (tokens of b choosing i)` and `P_i` is the mean over b's tokens of
    the scores normalised to sum to 1 per token. The result is `mean_b L_b`, so equal-sized
    batch splits (data parallel) average to the same value.

    Args:
        scores: `[B * S, E]` float32 router scores.
        top_k_index: `[B * S, k]` selected experts.
        batch_size: B.
        stats_reducer: For sequences sharded over ranks (context parallelism): reduces the
            per-sequence statistics to whole-sequence ones first (see `StatsReducer`); every
            rank then returns the loss of the whole sequences. None: the sequences are whole.

    Returns:
        A float32 scalar (without the coefficient).
    """
    tokens, num_experts = scores.shape
    seq_len, k = tokens // batch_size, top_k_index.shape[1]
    # Per-(sequence, expert) counts as a scatter-add into a static `[B * E]` (exact integer
    # sums, like `bincount`, but with a shape known before the data: it traces in one graph).
    rows = torch.arange(batch_size, device=scores.device).view(batch_size, 1)
    flat = (rows * num_experts + top_k_index.view(batch_size, seq_len * k)).view(-1)
    counts = torch.zeros(
        batch_size * num_experts, dtype=torch.int64, device=scores.device
    ).scatter_add(0, flat, torch.ones_like(flat))
    probs = scores / scores.sum(-1, keepdim=True)
    if stats_reducer is not None:
        counts, prob_sums, seq_len = stats_reducer(
            counts.view(batch_size, num_experts),
            probs.view(batch_size, seq_len, num_experts).sum(1),
            seq_len,
        )
        f = counts.float() * (num_experts / (k * seq_len))
        return (f * (prob_sums / seq_len)).sum(-1).mean()
    f = counts.view(batch_size, num_experts).float() * (num_experts / (k * seq_len))
    p = probs.view(batch_size, seq_len, num_experts).mean(1)
    return (f * p).sum(-1).mean()


class MoEBlock(nn.Module):
    """Routed experts plus optional shared experts: the `mlp` of an MoE decoder block.

    Args:
        hidden_size: H.
        num_experts: E.
        top_k: k.
        expert_hidden_size: I of one routed expert.
        num_shared_experts: Shared experts, fused into one `DenseMLP`; 0 means none.
        score_func: Router score function.
        norm_topk_prob: Renormalise top-k weights.
        routing_bias: Aux-loss-free balancing buffers on the router.
        aux_loss_coef: Weight of `sequence_balance_loss`; 0 skips computing it.
        dtype: Parameter dtype.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        expert_hidden_size: int,
        *,
        num_shared_experts: int = 0,
        score_func: str = "softmax",
        norm_topk_prob: bool = True,
        routing_bias: bool = False,
        aux_loss_coef: float = 0.0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.aux_loss_coef = aux_loss_coef
        #: Hook for sequence-sharded inputs: reduces the aux-loss statistics over the ranks that
        #: share the sequences (context parallelism sets it); None for whole sequences.
        self.stats_reducer: StatsReducer | None = None
        self.gate = TopKRouter(
            hidden_size,
            num_experts,
            top_k,
            score_func=score_func,
            norm_topk_prob=norm_topk_prob,
            routing_bias=routing_bias,
            dtype=dtype,
        )
        self.experts = RoutedExperts(num_experts, hidden_size, expert_hidden_size, dtype=dtype)
        self.shared_experts: DenseMLP | None = None
        if num_shared_experts:
            self.shared_experts = DenseMLP(
                hidden_size, expert_hidden_size * num_shared_experts, dtype=dtype
            )

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route `hidden` `[B, S, H]`; return `(output [B, S, H], aux_loss float32 scalar)`."""
        b, s, h = hidden.shape
        flat = hidden.reshape(b * s, h)
        top_k_index, top_k_weights, scores = self.gate(flat)
        out = self.experts(flat, top_k_index, top_k_weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        if self.aux_loss_coef:
            aux = self.aux_loss_coef * sequence_balance_loss(
                scores, top_k_index, b, self.stats_reducer
            )
        else:
            aux = torch.zeros((), device=hidden.device)
        return out.view(b, s, h), aux


@torch.no_grad()
def update_routing_bias_(model: nn.Module, rate: float) -> None:
    """Nudge every router's selection bias towards balance and reset its load counter.

    DeepSeek-V3's sign rule: `bias += rate * sign(mean(load) - load)`. Call it after the
    optimizer step, never inside forward. Under data/context parallelism `expert_load` must
    hold the global counts so every rank applies the same update: every moetx pass applied on
    such a mesh sums them, `moetx.sync_routing_load` does it for a model no pass touched.

    Args:
        model: Any module; routers without `routing_bias` are skipped.
        rate: Bias update speed (DeepSeek-V3 used 0.001).
    """
    for module in model.modules():
        if isinstance(module, TopKRouter) and module.expert_load is not None:
            assert module.e_score_correction_bias is not None
            load = module.expert_load.float()
            module.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))
            module.expert_load.zero_()
