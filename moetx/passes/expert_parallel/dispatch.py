"""Token dispatchers for expert parallelism: send each routed token copy to its expert's rank and back.

A dispatcher is a pair of functions over one expert-parallel (ep) group of D ranks, each holding
`E / D` consecutive experts (rank r holds global experts `[r * E/D, (r + 1) * E/D)`, matching a
`Shard(0)` DTensor on the ep mesh):

- `dispatch(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> (tokens [N, H],
  expert_ids [N], plan)`: the N token copies this rank's experts must process, grouped by local
  expert id (non-decreasing), and an immutable plan;
- `combine(expert_out [N, H], plan) -> [T, H]`: every token's weighted sum over its k experts.

The plan is an immutable `NamedTuple` returned by `dispatch` and consumed by `combine`
(torchtitan's design): neither the dispatcher nor the module holds state between the two calls, so
several layers, activation-checkpoint recomputation and re-entrant calls cannot mix up their
metadata. Dispatchers are built once, at apply time; the forward builds only tuples, and every
data-dependent step goes through `moetx.passes.expert_parallel.ops` (eager collectives, or opaque
custom ops while `torch.compile` traces), so a block with expert parallelism compiles whole.

Both dispatchers use only autograd-aware functional collectives for tensors that carry gradients
(`torch.distributed._functional_collectives.*_autograd`), so the router, the hidden states and
the experts all receive gradients, and an expert that got no token gets a zero gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import attrs
import torch
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.distributed_c10d import GroupName

from moetx.passes.expert_parallel import ops

__all__ = [
    "DISPATCHERS",
    "AllGatherDispatcher",
    "AllGatherPlan",
    "AllToAllDispatcher",
    "AllToAllPlan",
    "TokenDispatcher",
    "make_dispatcher",
]

DISPATCHERS: tuple[str, ...] = ("all_to_all", "all_gather")
"""Names `ExpertParallel(dispatcher=...)` accepts."""


class TokenDispatcher(Protocol):
    """Moves token copies to the ranks owning their experts (`dispatch`) and back (`combine`)."""

    def dispatch(
        self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor
    ) -> tuple[Tensor, Tensor, object]:
        """Return `(tokens [N, H], local expert ids [N] non-decreasing, plan)`."""
        ...

    def combine(self, expert_out: Tensor, plan: object) -> Tensor:  # pragma: no cover - protocol
        """Return `[T, H]`: for each local token, `sum_k weight[t, k] * output of copy (t, k)`."""
        ...


def _inverse(permutation: Tensor) -> Tensor:
    """The inverse of a permutation vector, in O(n) (a scatter, not a sort)."""
    out = torch.empty_like(permutation)
    return out.scatter_(
        0, permutation, torch.arange(permutation.numel(), device=permutation.device)
    )


# --------------------------------------------------------------------------------- all-to-all


class AllToAllPlan(NamedTuple):
    """What `AllToAllDispatcher.combine` needs to undo a `dispatch`; immutable.

    Attributes:
        unsort: `[T*k]` inverse of the stable sort of the (token, k) copies by global expert id.
        input_splits: Copies this rank sent to each ep rank (a list eagerly, a `[D]` int64
            tensor while compiling).
        output_splits: Copies this rank received from each ep rank (likewise).
        restore: `[N]` inverse of the received-order permutation: maps the expert-major rows
            (`[local expert][src rank]`) back to the received order (`[src rank][local expert]`).
        top_k_weights: `[T, k]` routing weights, applied here, on the sending rank, after the
            outputs come back, so the router's gradient never crosses ranks.
    """

    unsort: Tensor
    input_splits: Tensor | list[int]
    output_splits: Tensor | list[int]
    restore: Tensor
    top_k_weights: Tensor


@attrs.frozen(eq=False)
class EPGroup:
    """What a dispatcher knows about its expert-parallel group.

    Attributes:
        group: The ep process group.
        rank: This rank's index in the group (which chunk of experts it holds).
        degree: D, the group size.
        num_experts: E (global), divisible by D.
        group_name: The group's name (what functional collectives and the custom ops take).
    """

    group: ProcessGroup
    rank: int
    degree: int
    num_experts: int
    group_name: GroupName = attrs.field(
        init=False,
        default=attrs.Factory(lambda self: GroupName(self.group.group_name), takes_self=True),
    )


@attrs.frozen(eq=False)
class AllToAllDispatcher(EPGroup):
    """Uneven all-to-all dispatch: each token copy travels once to its expert's rank and back.

    Per call to `dispatch`, on every rank of the group:

    1. count copies per global expert (an `index_add`, static shape `[E]`) and exchange the
       counts with one int64
       functional `all_to_all_single` (equal splits of E/D);
    2. stable-sort the (token, k) copies by global expert id, so the copies for each rank (and
       each of its experts) are contiguous;
    3. move them with one uneven `all_to_all_single_autograd` (split sizes from step 1; zero
       sizes are fine on gloo; `ops.all_to_all`, an opaque op while compiling);
    4. permute the received rows from `[src rank][local expert]` to `[local expert][src rank]`
       order, so each local expert's tokens are contiguous.

    `combine` inverts 4, runs the reverse `all_to_all_single_autograd`, unsorts, and takes the
    weighted sum over k. Collectives per MoE layer: forward 3 (`_c10d_functional.all_to_all_single`:
    the int64 count exchange and two autograd ones), backward 2 (the autograd ones reversed);
    the same when compiled (the uneven ones are then `moetx::ep_all_to_all` nodes).

    Fields: see `EPGroup`.
    """

    def dispatch(
        self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor
    ) -> tuple[Tensor, Tensor, AllToAllPlan]:
        """Send every (token, k) copy to the rank of its expert; see the class docstring."""
        d, e = self.degree, self.num_experts
        local_e = e // d
        k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)
        with torch.no_grad():
            # Copies per global expert (`bincount` with static shape [E]).
            sent_per_expert = torch.zeros(e, dtype=torch.int64, device=flat.device)
            sent_per_expert = sent_per_expert.index_add(0, flat, torch.ones_like(flat))
            recv_per_expert = funcol.all_to_all_single(sent_per_expert, None, None, self.group_name)
            # [src rank][local expert] -> copies this rank receives.
            recv_grid = recv_per_expert.view(d, local_e)
            sent_tensor, recv_tensor = sent_per_expert.view(d, local_e).sum(1), recv_grid.sum(1)
            input_splits: Tensor | list[int] = sent_tensor
            output_splits: Tensor | list[int] = recv_tensor
            if not torch.compiler.is_compiling():
                # Eager: the host syncs for the split sizes happen here, once per layer (a sync
                # in combine or backward would stall the CPU behind the experts' kernels).
                # Compiled, they stay tensors, inputs of the opaque `ops.all_to_all`.
                input_splits, output_splits = sent_tensor.tolist(), recv_tensor.tolist()
            order = torch.argsort(flat, stable=True)
            expert_ids, permutation = ops.receive_layout(recv_grid)
        routed = hidden[order // k]
        received = ops.all_to_all(routed, output_splits, input_splits, self.group_name)
        tokens = received[permutation]
        plan = AllToAllPlan(
            unsort=_inverse(order),
            input_splits=input_splits,
            output_splits=output_splits,
            restore=_inverse(permutation),
            top_k_weights=top_k_weights,
        )
        return tokens, expert_ids, plan

    def combine(self, expert_out: Tensor, plan: Any) -> Tensor:
        """Send each copy's output back to its token's rank and sum the k copies, weighted."""
        back = expert_out[plan.restore]
        returned = ops.all_to_all(back, plan.input_splits, plan.output_splits, self.group_name)
        t, k = plan.top_k_weights.shape
        per_copy = returned[plan.unsort].view(t, k, returned.shape[-1])
        weights = plan.top_k_weights.to(per_copy.dtype).unsqueeze(-1)
        return (per_copy * weights).sum(1)


# --------------------------------------------------------------------------------- all-gather


class AllGatherPlan(NamedTuple):
    """What `AllGatherDispatcher.combine` needs; immutable.

    Attributes:
        num_tokens: T, this rank's token count.
        counts: `[D]` int64: every rank's token count (blocks are padded to the largest, Tmax).
        gathered_rows: D * Tmax, the rows of the gathered tokens (a SymInt while compiling).
        token_of_row: `[N]` row of each dispatched copy in the gathered `[D * Tmax, H]` tokens.
        weights: `[N]` routing weight of each dispatched copy (gathered with autograd).
    """

    num_tokens: int
    counts: Tensor
    gathered_rows: Any
    token_of_row: Tensor
    weights: Tensor


@attrs.frozen(eq=False)
class AllGatherDispatcher(EPGroup):
    """All-gather dispatch: every rank sees every token and runs its own experts on their copies.

    `dispatch` gathers the token counts (int64 `all_gather_single`), then the tokens and routing
    weights padded to the largest count (`all_gather_single_autograd`; gloo's list-form
    all_gather rejects uneven sizes) and the expert ids (`ops.gather_padded`). `combine`
    scatters the weighted outputs into a `[D * Tmax, H]` buffer of partial sums and returns each
    rank its block with `reduce_scatter_single_autograd(sum)` (`ops.scatter_padded`). It moves
    D times more data than all-to-all; it is the simple cross-check of `AllToAllDispatcher`.

    Fields: see `EPGroup`.
    """

    def dispatch(
        self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor
    ) -> tuple[Tensor, Tensor, AllGatherPlan]:
        """Gather every rank's tokens and pick the copies routed to this rank's experts."""
        local_e = self.num_experts // self.degree
        t, k = top_k_index.shape
        name = self.group_name
        with torch.no_grad():
            count = torch.tensor([t], dtype=torch.int64, device=hidden.device)
            counts = funcol.all_gather_single(count, 0, name)
            # Eager: read the padding once for the three gathers (a host sync); compiled, the
            # opaque ops read it themselves.
            most = None if torch.compiler.is_compiling() else int(counts.max())
            all_ids = ops.gather_padded(top_k_index, counts, -1, name, most)
            copies, expert_ids = ops.select_local(all_ids, self.rank * local_e, local_e)
        all_hidden = ops.gather_padded(hidden, counts, 0.0, name, most)
        all_weights = ops.gather_padded(top_k_weights, counts, 0.0, name, most)
        token_of_row = copies // k
        plan = AllGatherPlan(
            num_tokens=t,
            counts=counts,
            gathered_rows=all_hidden.shape[0],
            token_of_row=token_of_row,
            weights=all_weights.reshape(-1)[copies],
        )
        return all_hidden[token_of_row], expert_ids, plan

    def combine(self, expert_out: Tensor, plan: Any) -> Tensor:
        """Sum the weighted copies into partial outputs and reduce-scatter them to their ranks."""
        weighted = expert_out * plan.weights.to(expert_out.dtype).unsqueeze(-1)
        partial = expert_out.new_zeros(plan.gathered_rows, expert_out.shape[-1])
        partial = partial.index_add(0, plan.token_of_row, weighted)
        return ops.scatter_padded(partial, plan.counts, plan.num_tokens, self.group_name)


def make_dispatcher(name: str, ep_mesh: DeviceMesh, num_experts: int) -> TokenDispatcher:
    """Build the dispatcher called `name` (one of `DISPATCHERS`) for the 1-D ep mesh `ep_mesh`."""
    classes: dict[str, type[AllToAllDispatcher] | type[AllGatherDispatcher]] = {
        "all_to_all": AllToAllDispatcher,
        "all_gather": AllGatherDispatcher,
    }
    if name not in classes:
        raise ValueError(f"`dispatcher` ({name!r}) must be one of {DISPATCHERS}.")
    return classes[name](
        group=ep_mesh.get_group(),
        rank=ep_mesh.get_local_rank(),
        degree=ep_mesh.size(),
        num_experts=num_experts,
    )
