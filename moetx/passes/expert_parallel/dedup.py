"""Deduplicating all-to-all dispatch: a token travels once to each rank that holds any of its experts.

`AllToAllDispatcher` sends every (token, k) copy. When several of a token's k experts live on
one rank, that sends the same hidden row there several times, and the combine sends several
rows back. `DedupAllToAllDispatcher` sends one row per distinct (token, destination rank) pair,
expands it on the destination into one copy per local expert the token chose, and sends back
one row per pair: the weighted sum of that rank's experts' outputs (so the routing weights are
applied on the destination, and travel with the token).

Each sent row is the hidden state followed by `E/D` weight columns (the token's routing weight
for each local expert of the destination, 0 where it chose none) and `ceil(E/D / b)` mask
columns: which local experts it chose, as integers below `2**b`, `b` the payload dtype's
significand bits (24 in fp32, 8 in bf16, 11 in fp16), so the mask is exact in any float dtype
(a chosen expert whose weight is exactly 0 still gets its copy and its weight its gradient).
The weights travel in the payload dtype: the per-copy dispatcher casts them to the experts'
output dtype before weighting too, so the rounding is the same. Packing them with the payload
keeps the collectives per MoE layer what they are for `AllToAllDispatcher`: forward 3 (an int64
exchange of the pair counts, the dispatch, the combine), backward 2.

Bytes (rows that leave a rank, per layer, forward + backward): `2·P·(H + E/D + c) + 2·P·H`
for `P` remote pairs, against `4·C·H` for `C` remote copies: fewer whenever tokens share ranks
(`C / P` is about 1.27 for 8 experts, top-2 on 2 ranks), more (by the weight and mask columns)
when no two of a token's experts share a rank (with top-1, or one expert per rank, where this
can never happen, it dispatches per copy instead).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import attrs
import torch
from torch import Tensor
from torch.distributed import _functional_collectives as funcol

from moetx.passes.expert_parallel import ops
from moetx.passes.expert_parallel.dispatch import AllToAllDispatcher, AllToAllPlan

__all__ = ["DedupAllToAllDispatcher", "DedupPlan", "mask_columns"]


def _mask_bits(dtype: torch.dtype) -> int:
    """Bits of an integer that `dtype` holds exactly (its significand, with the implicit one)."""
    return round(-math.log2(torch.finfo(dtype).eps)) + 1


def mask_columns(local_experts: int, dtype: torch.dtype) -> int:
    """Mask columns per sent row: `ceil(local_experts / bits)` for the payload `dtype`."""
    return -(-local_experts // _mask_bits(dtype))


class DedupPlan(NamedTuple):
    """What `DedupAllToAllDispatcher.combine` needs to undo a `dispatch`; immutable.

    Attributes:
        num_tokens: T, this rank's token count.
        pair_token: `[P]` token of each (token, rank) pair this rank sent, grouped by rank.
        input_splits: Pairs sent to each ep rank (a list eagerly, a `[D]` tensor compiling).
        output_splits: Pairs received from each ep rank (likewise).
        received_rows: R, the rows received (a SymInt while compiling).
        row_of_copy: `[N]` received row of each dispatched copy (grouped by local expert).
        copy_weights: `[N]` routing weight of each copy, read from the received rows (so its
            gradient travels back to the router with the hidden states' gradient).
    """

    num_tokens: int
    pair_token: Tensor
    input_splits: Tensor | list[int]
    output_splits: Tensor | list[int]
    received_rows: Any
    row_of_copy: Tensor
    copy_weights: Tensor


@attrs.frozen(eq=False)
class DedupAllToAllDispatcher(AllToAllDispatcher):
    """Uneven all-to-all dispatch of distinct (token, rank) pairs; see the module docstring.

    `dispatch`: mark the ranks each token goes to (`[T, D]`, static shape), exchange the pair
    counts (one int64 `all_to_all_single`, one count per rank), list the pairs grouped by rank
    (`ops.column_nonzero`), send hidden + weight + mask columns (`ops.all_to_all`), decode the
    masks and list the copies grouped by local expert, then source rank, then token: the rows
    and expert ids `AllToAllDispatcher` hands the experts, in the same order. `combine`: weight
    the copies, sum them per received row, send the partial sums back, add them per token.

    With `min(k, E/D) == 1` no token has two experts on one rank, so pairs are copies: it
    dispatches as `AllToAllDispatcher` (no weight or mask columns to pay for).

    Fields: see `EPGroup`.
    """

    def dispatch(
        self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor
    ) -> tuple[Tensor, Tensor, Any]:
        """Send each token once to every rank holding one of its experts; the plan is a
        `DedupPlan` (an `AllToAllPlan` when it dispatches per copy)."""
        d, e = self.degree, self.num_experts
        local_e = e // d
        if min(top_k_index.shape[1], local_e) == 1:
            return super().dispatch(hidden, top_k_index, top_k_weights)
        t, h = hidden.shape
        bits = _mask_bits(hidden.dtype)
        slot = torch.arange(local_e, device=hidden.device)
        column, shift = slot // bits, slot % bits
        with torch.no_grad():
            chosen = torch.zeros(t, e, dtype=torch.bool, device=hidden.device)
            chosen = chosen.scatter_(1, top_k_index, True).view(t, d, local_e)
            goes = chosen.any(2)  # [T, D]: token t has an expert on rank r
            sent = goes.sum(0)
            received_count = funcol.all_to_all_single(sent, None, None, self.group_name)
            input_splits: Tensor | list[int] = sent
            output_splits: Tensor | list[int] = received_count
            if not torch.compiler.is_compiling():
                # Eager: one host sync per layer, here (compiled: tensors, inputs of the op).
                input_splits, output_splits = sent.tolist(), received_count.tolist()
            pair_rank, pair_token = ops.column_nonzero(goes)
            bit = chosen.long() << shift
            if local_e <= bits:  # one mask column (fp32: up to 24 local experts, bf16: 8)
                code = bit.sum(2, keepdim=True)
            else:
                code = bit.new_zeros(t, d, mask_columns(local_e, hidden.dtype))
                code = code.index_add_(2, column, bit)
            mask = code[pair_token, pair_rank].to(hidden.dtype)
        weights = hidden.new_zeros(t, e).scatter(1, top_k_index, top_k_weights.to(hidden.dtype))
        rows = torch.cat(
            [hidden[pair_token], weights.view(t, d, local_e)[pair_token, pair_rank], mask], 1
        )
        received = ops.all_to_all(rows, output_splits, input_splits, self.group_name)
        with torch.no_grad():
            code = received[:, h + local_e :].to(torch.int64)
            if local_e > bits:
                code = code[:, column]
            mine = ((code >> shift) & 1).bool()  # [R, E/D]
            expert_ids, row_of_copy = ops.column_nonzero(mine)
        plan = DedupPlan(
            num_tokens=t,
            pair_token=pair_token,
            input_splits=input_splits,
            output_splits=output_splits,
            received_rows=received.shape[0],
            row_of_copy=row_of_copy,
            copy_weights=received[row_of_copy, h + expert_ids],
        )
        return received[row_of_copy, :h], expert_ids, plan

    def combine(self, expert_out: Tensor, plan: Any) -> Tensor:
        """Weight and sum each received row's copies, send the sums back, add them per token."""
        if isinstance(plan, AllToAllPlan):
            return super().combine(expert_out, plan)
        h = expert_out.shape[-1]
        weighted = expert_out * plan.copy_weights.to(expert_out.dtype).unsqueeze(-1)
        partial = expert_out.new_zeros(plan.received_rows, h).index_add(
            0, plan.row_of_copy, weighted
        )
        back = ops.all_to_all(
            partial,
            plan.input_splits,
            plan.output_splits,
            self.group_name,
            out_rows=plan.pair_token.shape[0],
        )
        return back.new_zeros(plan.num_tokens, h).index_add(0, plan.pair_token, back)
