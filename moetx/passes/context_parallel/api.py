"""`ContextParallel`: split every sequence over the `cp` mesh axis, attention and aux loss included."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from moetx.core.algebra import Pass, register_pass
from moetx.core.errors import (
    ContextParallelInputError,
    PassPreconditionError,
    SequenceDivisibilityError,
    UnsupportedAttentionError,
)
from moetx.core.options import axis_name, flag, one_of, option
from moetx.core.order import Placement
from moetx.core.record import Applied
from moetx.mesh.parallel_mesh import ParallelMesh, as_parallel_mesh
from moetx.passes.context_parallel.attention import (
    COMMS,
    ContextParallelAttentionCore,
    sequence_index,
)
from moetx.passes.context_parallel.hf import hf_attention_problems, install_hf
from moetx.passes.context_parallel.hooks import InputGuard, StatsReducer
from moetx.passes.foreign import refuse_foreign_parallelism
from moetx.passes.load_sync import sync_routing_load
from moetx.structure.discovery import ModelStructure, discover
from moetx.structure.hf import hf_model_type

__all__ = ["ContextParallel", "ContextParallelInputError", "is_context_parallel"]

_GUARD_ATTR = "_moetx_context_parallel"


@register_pass("cp")
@typing.final
@attrs.frozen(kw_only=True, repr=False)
class ContextParallel(Pass):
    """Split every sequence over a mesh axis: attention, RoPE positions and the MoE aux loss.

    **What it shards.** Activations along the sequence dim; no parameter changes (CP ranks
    hold the same parameters, and `FSDP` shards them over dp_shard x cp). With degree D and
    `load_balance`, each sequence is cut into 2D equal chunks and rank r holds chunks r and
    2D-1-r, so every rank does the same causal-attention work; without it, rank r holds the
    r-th of D contiguous chunks. `shard_sequence` cuts a batch (tokens, labels, global
    positions) this way; the training loop otherwise stays the same:

        cp = ContextParallel()
        model = (cp | FSDP()).apply(model, mesh)
        ids, labels, positions = cp.shard_sequence(mesh, ids, labels)
        model(ids, labels=labels, position_ids=positions).loss.backward()

    The mean over the cp ranks of their losses is the loss on the whole sequences when every
    rank holds the same number of targeted labels (always, without `IGNORE_INDEX` labels).

    **What it changes.** Each block's attention kernel (`self_attn.core`) becomes a
    `ContextParallelAttentionCore`, which attends over the whole sequences: it computes the
    (query chunk, key chunk) pairs that causality allows, read off each chunk's global token
    indices, with the CPU flash kernel (a float32 math kernel off CPU), and merges them by
    log-sum-exp. RoPE needs no change: the model rotates with the global `position_ids` it is
    given. `comm="allgather"` all-gathers K/V in one autograd-aware collective (fast; each
    rank keeps the whole K/V for backward); `comm="p2p"` passes K/V blocks round a ring, the
    next in flight while one is computed, with its own ring backward (each rank keeps only its
    K/V). GQA works in both (`moetx.passes.context_parallel.attention` has the details).
    Hugging Face transformers models are handled unmodified through transformers' attention
    registry, selected for this model only (`moetx.passes.context_parallel.hf`: GQA, MLA,
    sliding windows, attention sinks; their batches follow the recipe in README's training
    loop; their routers' aux loss is reduced over cp by `hf_aux`). Each `MoEBlock` gets a
    `stats_reducer` that sums its sequence-wise aux-loss statistics over the cp group (the
    score sums through an autograd-aware all-gather), so each rank's aux loss is the whole
    sequences' aux loss and its gradient, averaged over the cp ranks as FSDP does, is the
    single-process one. (The aux-loss-free `expert_load` counters are summed over the token
    ranks, as every pass does: `moetx.passes.load_sync`.) The root
    module gets a forward pre-hook that refuses calls without `position_ids` (a forgotten
    `shard_sequence` would otherwise attend silently across unrelated chunks) and, with one
    all-gather of two integers per forward, local shapes that differ across the cp ranks
    (`ContextParallelInputError`) or an odd local length under `load_balance`
    (`SequenceDivisibilityError`), on every rank alike. With degree 1
    nothing is installed.

    Stage `cp`: first, before `ep`, `ac` and `fsdp`. `apply` consumes its input: it mutates the
    model in place and returns it.

    Preconditions (checked before anything changes, each a typed `MoetxError`):
        - the mesh has `axis` (`MeshAxisError`);
        - the model holds no parallelism from outside moetx: no torch `fully_shard` unit, no
          DTensor parameter (`PassPreconditionError`);
        - every block's attention has a parameter-free `core` child declaring `is_causal = True`
          (moetx's `CausalAttentionCore` contract), and no attention-like module lies outside
          the blocks (`UnsupportedAttentionError`, naming every offending block; never a
          warning: a skipped attention would see 1/cp of each sequence, Automodel#3507);
        - the model has no multi-token-prediction head: its label shift crosses shard
          boundaries (`PassPreconditionError`);
        - every MoE layer has the `stats_reducer` hook (`PassPreconditionError`).
    A sequence length that is not a multiple of 2 x cp (cp without `load_balance`) is refused
    by `shard_sequence` (`SequenceDivisibilityError`): the model cannot know it at apply time.

    Upstream APIs: `torch.distributed._functional_collectives.all_gather_single_autograd` and
    `all_reduce`, `torch.distributed.batch_isend_irecv`,
    `aten._scaled_dot_product_flash_attention_for_cpu` (and its backward), inside
    `torch.autograd.Function`s. torch's own `context_parallel()` is not used: it has no CPU
    kernel mapping (TORCH-CPU-NOTES §1).

    Args:
        axis: Mesh axis the sequences are split over; its degree is read from the mesh.
        comm: How K/V move: `"allgather"` or `"p2p"` (ring).
        load_balance: Head-tail chunk layout for causal attention.

    Example:
        >>> ContextParallel(comm="p2p")
        ContextParallel(comm='p2p')
    """

    placement: ClassVar[Placement] = Placement.builtin("cp")

    axis: str = option("cp", axis_name())
    comm: str = option("allgather", one_of(*COMMS))
    load_balance: bool = option(True, flag())

    # ------------------------------------------------------------------------------ the pass

    def check(self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]) -> None:
        """Raise if the mesh lacks the axis or any part of the model cannot be context-parallel."""
        mesh.require(self.axis, by="ContextParallel")
        refuse_foreign_parallelism(model, record, by="ContextParallel")
        structure = discover(model)
        hf = hf_model_type(model) is not None
        problems = [
            *(hf_attention_problems(model, structure) if hf else _core_problems(structure)),
            *_stray_attention_problems(model, structure),
        ]
        if problems:
            fix = (
                "use a model whose layers are full or sliding-window causal attention, "
                "without attention dropout (`attention_dropout=0.0`)"
                if hf
                else "give every attention a parameter-free causal `core(q, k, v)` child (see "
                "`moetx.models.CausalAttentionCore`)"
            )
            raise UnsupportedAttentionError(
                "\n".join(problems) + "\n"
                "  why: an attention left as it is would attend to 1/cp of each sequence "
                "(Automodel#3507), so moetx refuses instead of skipping it.\n"
                f"  fix: {fix}, or leave `ContextParallel` out."
            )
        mtp = [b.fqn for b in structure.blocks if b.is_mtp]
        if mtp:
            raise PassPreconditionError(
                f"`{type(model).__name__}` has a multi-token-prediction head (blocks "
                f"{', '.join(f'`{f}`' for f in mtp)}), which `ContextParallel` does not support: "
                "its label shift crosses sequence-shard boundaries.\n"
                "  fix: build the model without the MTP head (`num_mtp_layers=0`), or train it "
                "without context parallelism."
            )
        # HF routers' aux loss is computed in `...ForCausalLM.forward` from every layer's router
        # logits, not in the MoE layers: a hook on the model reduces it (`hf_aux`).
        hookless = [m.fqn for m in structure.moe_layers() if m.stats_reducer_attr is None]
        if hookless and not hf:
            raise PassPreconditionError(
                f"MoE layer `{hookless[0]}` has no `stats_reducer` hook, so `ContextParallel` "
                "cannot reduce its aux-loss statistics over the cp group "
                f"({len(hookless)} layer(s) in all).\n"
                "  fix: compute the aux loss like `moetx.models.MoEBlock` (`sequence_balance_loss`"
                " with a `stats_reducer` attribute)."
            )

    def _apply(
        self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]
    ) -> nn.Module:
        # Routing-load counters count every token rank's tokens, not this rank's (load_sync).
        sync_routing_load(model, mesh)
        if mesh.degree(self.axis) == 1:
            return model
        cp_mesh = mesh[self.axis]
        structure = discover(model)
        if hf_model_type(model) is not None:
            hook = install_hf(
                model, structure, cp_mesh, self.comm, self.load_balance, mesh.root.get_group()
            )
            model.__dict__[_GUARD_ATTR] = hook
            # Then the shape checks every CP model gets (equal local shapes, even lengths).
            model.register_forward_pre_hook(
                InputGuard(cp_mesh, self.load_balance), with_kwargs=True
            )
            return model
        for block in structure.blocks:
            block.attention.core = ContextParallelAttentionCore(
                cp_mesh, self.comm, self.load_balance
            )
            if block.moe is not None and block.moe.stats_reducer_attr is not None:
                setattr(block.moe.module, block.moe.stats_reducer_attr, StatsReducer(cp_mesh))
        model.__dict__[_GUARD_ATTR] = model.register_forward_pre_hook(
            InputGuard(cp_mesh, self.load_balance), with_kwargs=True
        )
        return model

    def facts(self, model: nn.Module, mesh: ParallelMesh) -> Mapping[str, Any]:
        """`axis`, `degree`, `comm`, `load_balance` and `attention_cores` (FQNs replaced)."""
        degree = mesh.degree(self.axis)
        cores = (
            tuple(str(b.attention_core_fqn) for b in discover(model).blocks) if degree > 1 else ()
        )
        return {
            "axis": self.axis,
            "degree": degree,
            "comm": self.comm,
            "load_balance": self.load_balance,
            "attention_cores": cores,
        }

    # ---------------------------------------------------------------------------- the batch

    def shard_sequence(
        self,
        mesh: ParallelMesh | DeviceMesh,
        input_ids: Tensor,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Return this rank's part of a batch: `(input_ids, labels, position_ids)`.

        Call it on every cp rank with the same whole-sequence batch (the rows of this rank's
        data-parallel group) and feed the results to the model, `position_ids` included.

        Args:
            mesh: The mesh the model was parallelized with.
            input_ids: `[B, S]` (or `[S]`) token ids of whole sequences.
            labels: Position-aligned labels, same shape, or None.
            position_ids: Global positions, same shape or `[S]`; default `arange(S)`. They are
                used only for RoPE: the causal mask follows token order, as in the model.

        Returns:
            `(input_ids, labels, position_ids)` cut along the last dim to this rank's
            `S / cp` tokens; `position_ids` always holds true global positions, shaped like
            the returned `input_ids`.

        Raises:
            SequenceDivisibilityError: `S` is not a multiple of 2 x cp (of cp without
                `load_balance`).
            ContextParallelInputError: `labels` or `position_ids` do not match `input_ids`.
        """
        pmesh = as_parallel_mesh(mesh)
        degree = pmesh.degree(self.axis)
        seq_len = input_ids.shape[-1]
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device)
        for name, t in (("labels", labels), ("position_ids", position_ids)):
            if t is not None and t.shape != input_ids.shape and t.shape != (seq_len,):
                raise ContextParallelInputError(
                    f"`{name}` has shape {tuple(t.shape)}, which does not match `input_ids` "
                    f"{tuple(input_ids.shape)}."
                )
        position_ids = position_ids.expand(input_ids.shape)
        chunks = 2 * degree if self.load_balance else degree
        if seq_len % chunks:
            how = f"2 × cp (2 × {degree} = {chunks})" if self.load_balance else f"cp ({degree})"
            raise SequenceDivisibilityError(
                f"The sequence length of `input_ids` ({seq_len}) must be divisible by {how}: "
                f"`ContextParallel(load_balance={self.load_balance})` cuts every sequence into "
                f"{chunks} equal chunks.\n"
                f"  fix: pad or trim the sequences to a multiple of {chunks}."
            )
        if degree == 1:
            return input_ids, labels, position_ids
        rank = pmesh[self.axis].get_local_rank()
        index = sequence_index(seq_len // degree, rank, degree, self.load_balance, input_ids.device)

        def cut(t: Tensor) -> Tensor:
            return t.index_select(-1, index)

        return cut(input_ids), None if labels is None else cut(labels), cut(position_ids)

    def gather_sequence(self, mesh: ParallelMesh | DeviceMesh, x: Tensor, dim: int = 1) -> Tensor:
        """Inverse of `shard_sequence` for an activation: the whole sequences on every cp rank.

        Autograd-aware (the backward returns each rank its slice). A collective: call it on
        every rank of the cp group.

        Args:
            mesh: The mesh the model was parallelized with.
            x: This rank's part, sequence along `dim` (e.g. logits `[B, S / cp, V]`).
            dim: The sequence dim of `x`.

        Returns:
            `x` for the whole sequences, in global token order.
        """
        pmesh = as_parallel_mesh(mesh)
        degree = pmesh.degree(self.axis)
        if degree == 1:
            return x
        local = x.shape[dim]
        moved = x.movedim(dim, 0).contiguous()
        gathered = funcol.all_gather_single_autograd(moved, 0, pmesh[self.axis].get_group())
        index = torch.cat(
            [sequence_index(local, r, degree, self.load_balance, x.device) for r in range(degree)]
        )
        return gathered[torch.argsort(index)].movedim(0, dim)


def is_context_parallel(model: nn.Module) -> bool:
    """Whether `ContextParallel` installed its attention kernels on `model` (degree > 1)."""
    return _GUARD_ATTR in model.__dict__


# ------------------------------------------------------------------------------ preconditions


def _attention_like(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, nn.MultiheadAttention) or "attention" in name or "attn" in name


def _core_problems(structure: ModelStructure) -> list[str]:
    problems = []
    for b in structure.blocks:
        where = f"`{b.attention_fqn}` (`{type(b.attention).__name__}`) in block `{b.fqn}`"
        core = b.attention_core
        if core is None:
            problems.append(
                f"{where} cannot be made context-parallel: it has no `core` child computing "
                "`core(q, k, v)`."
            )
        elif getattr(core, "is_causal", None) is not True:
            problems.append(
                f"{where} cannot be made context-parallel: its core `{b.attention_core_fqn}` "
                f"(`{type(core).__name__}`) does not declare `is_causal = True`; moetx shards "
                "causal attention only."
            )
        elif any(True for _ in core.parameters()) or any(True for _ in core.buffers()):
            problems.append(
                f"{where} cannot be made context-parallel: its core `{b.attention_core_fqn}` "
                f"(`{type(core).__name__}`) holds parameters or buffers, which replacing it "
                "would drop."
            )
    return problems


def _stray_attention_problems(model: nn.Module, structure: ModelStructure) -> list[str]:
    problems = []
    # Attention modules outside the blocks' `self_attn` would be skipped silently.
    covered = tuple(f"{b.attention_fqn}." for b in structure.blocks)
    attention_fqns = {b.attention_fqn for b in structure.blocks}
    for fqn, module in model.named_modules():
        if fqn in attention_fqns or f"{fqn}.".startswith(covered) or not _attention_like(module):
            continue
        owner = next((b.fqn for b in structure.blocks if fqn.startswith(f"{b.fqn}.")), None)
        problems.append(
            f"`{fqn}` (`{type(module).__name__}`) "
            + (f"in block `{owner}`" if owner else "outside every transformer block")
            + " cannot be made context-parallel: moetx handles only each block's `self_attn`."
        )
    return problems
