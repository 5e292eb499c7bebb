"""`TensorParallel`: shard attention heads, dense MLPs and the vocabulary over the `tp` mesh axis."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

import attrs
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from moetx.core.algebra import Pass, register_pass
from moetx.core.errors import PassPreconditionError
from moetx.core.options import axis_name, flag, option
from moetx.core.order import Placement
from moetx.core.record import Applied
from moetx.passes.foreign import refuse_foreign_parallelism
from moetx.passes.load_sync import sync_routing_load
from moetx.passes.tensor_parallel.latent import install_shared_key_grad_sum
from moetx.passes.tensor_parallel.sequence import (
    install_sequence_parallel,
    sequence_parallel_problems,
)
from moetx.passes.tensor_parallel.targets import TPTarget, tp_targets
from moetx.structure.discovery import discover

if typing.TYPE_CHECKING:
    from moetx.mesh.parallel_mesh import ParallelMesh

__all__ = ["TensorParallel"]


@register_pass("tp")
@typing.final
@attrs.frozen(kw_only=True, repr=False)
class TensorParallel(Pass):
    """Megatron-style tensor parallelism for the dense path, on torch's `parallelize_module`.

    **What it shards** (over `mesh[axis]`, degree T), for every block the structure module
    finds, backbone and MTP, on moetx's synthetic models and Hugging Face models alike:

    - attention: `q_proj`, `k_proj`, `v_proj` column-wise (by heads), `o_proj` row-wise. Query
      and key/value head counts must be divisible by T; key/value heads are never replicated
      to reach T (GQA with fewer kv heads than T is refused: replicating them would change
      which query heads share a key, or cost a gather per layer);
    - dense MLPs and shared experts: `gate_proj`, `up_proj` column-wise, `down_proj` row-wise;
    - the input embedding row-wise over the vocabulary and the lm head column-wise, its logits
      gathered to the full vocabulary (the loss sees ordinary logits); tied embeddings stay
      replicated (both modules use one weight, and the two shardings differ in layout);
    - routers, norms and routed experts stay replicated: experts belong to `ExpertParallel`.

    Every tp rank holds the same tokens, so a replicated parameter gets the same gradient on
    each of them and is never reduced over tp; FSDP and the training helpers average over the
    token ranks (`MeshDegrees.token_ranks`: the world without tp), and expert gradients are
    divided by that count, never by the world (which would shrink them T times).

    Stage `tp`: first of all (`tp -> cp -> ep -> ac -> compile -> fsdp`), as in the reference
    parallelizer and torchtitan: FSDP2 then shards the TP DTensors into 2-D `(dp, tp)`
    placements. `apply` consumes its input: it mutates the model in place and returns it.

    Preconditions (typed `MoetxError`s, before anything changes): the mesh has `axis`; the model
    has blocks; every attention has `q/k/v/o_proj` linears and no other per-head parameters
    (gpt-oss sinks), head and kv-head counts divisible by T; every MLP's inner size and the
    vocabulary divisible by T; no parameter is a DTensor already.

    Upstream APIs: `torch.distributed.tensor.parallel.parallelize_module`, `ColwiseParallel`,
    `RowwiseParallel`.

    **Sequence parallelism** (`sequence_parallel=True`, moetx's models): between the TP
    regions the residual stream, norms and residual adds are sharded on the sequence over tp,
    as torchtitan does; MoE blocks gather their rank's whole sequences, so every token is routed
    exactly once (`moetx.passes.tensor_parallel.sequence`).

    Args:
        axis: Mesh axis to shard over.
        sequence_parallel: Shard the residual stream on the sequence between TP regions.
    """

    placement = Placement.builtin("tp")
    axis: str = option("tp", axis_name())
    sequence_parallel: bool = option(False, flag())

    def check(self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]) -> None:
        """Raise if the axis, the structure or a divisibility rule does not allow TP."""
        mesh.require(self.axis, by="TensorParallel")
        refuse_foreign_parallelism(model, record, by="TensorParallel")
        structure = discover(model)
        if not structure.blocks:
            raise PassPreconditionError(
                f"`TensorParallel` found no transformer blocks in `{type(model).__name__}`."
            )
        tp_targets(model, mesh.degree(self.axis))  # raises on every structural problem
        problems = sequence_parallel_problems(model, structure) if self.sequence_parallel else []
        if problems:
            listed = "\n".join(f"  - {p}" for p in problems)
            raise PassPreconditionError(
                f"`TensorParallel(sequence_parallel=True)` cannot apply to "
                f"{type(model).__name__}:\n{listed}\n"
                "  fix: use `TensorParallel()` (sequence_parallel=False) for this model."
            )

    def _apply(
        self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]
    ) -> nn.Module:
        # Routing-load counters count every token rank's tokens, not this rank's (load_sync).
        sync_routing_load(model, mesh)
        degree = mesh.degree(self.axis)
        if degree == 1:
            return model
        tp_mesh = mesh[self.axis]
        for target in tp_targets(model, degree):
            parallelize_module(target.module, tp_mesh, _plan(target, self.sequence_parallel))
            for attr, value in target.local_attrs:
                setattr(target.module, attr, value)
            if target.kind == "latent_attention":
                install_shared_key_grad_sum(target.module, tp_mesh.get_group())
        if self.sequence_parallel:
            install_sequence_parallel(model, discover(model), tp_mesh)
        return model

    def facts(self, model: nn.Module, mesh: ParallelMesh) -> Mapping[str, Any]:
        """`axis`, `degree`, and `params`: FQNs of the parameters this pass made DTensors (the
        key `Pipeline.plan` reads to show which passes handle a parameter)."""
        params = tuple(n for n, p in model.named_parameters() if isinstance(p, DTensor))
        return {"axis": self.axis, "degree": mesh.degree(self.axis), "params": params}


def _plan(target: TPTarget, sequence: bool) -> ParallelStyle | dict[str, ParallelStyle]:
    # With sequence parallelism the residual stream between regions is `Shard(1)` (sequence):
    # region outputs reduce-scatter into it, region inputs are all-gathered out of it. Shared
    # experts sit inside the MoE block, whose input is already gathered.
    seq = Shard(1) if sequence else Replicate()
    if target.kind == "embedding":  # vocabulary-parallel lookup, summed over tp
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if target.kind == "lm_head":  # logits gathered to the full vocabulary
        return ColwiseParallel(input_layouts=seq, output_layouts=Replicate())
    out = seq if target.kind != "shared_mlp" else Replicate()
    return {
        **dict.fromkeys(target.colwise, ColwiseParallel()),
        **dict.fromkeys(target.rowwise, RowwiseParallel(output_layouts=out)),
        # [B, S, heads, head_dim] inputs sharded on heads (dim 2) by the colwise projections.
        **dict.fromkeys(target.per_head, SequenceParallel(sequence_dim=2, use_local_output=True)),
    }
