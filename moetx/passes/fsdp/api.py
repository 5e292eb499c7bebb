"""`FSDP`: FSDP2 (`fully_shard`) over dense and expert parameters, one unit per block.

Written on torch's own `torch.distributed.fsdp.fully_shard`; moetx only decides the units, the
meshes and the gradient scale, which are where MoE models go wrong (PEER-LESSONS.md).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from moetx.core.algebra import Pass, register_pass
from moetx.core.options import at_least, flag, option
from moetx.core.order import Placement
from moetx.core.record import Applied, applied_passes, find_applied
from moetx.mesh.parallel_mesh import ParallelMesh
from moetx.passes.fsdp.checks import check_fsdp
from moetx.passes.fsdp.compiled import drive_nested_units
from moetx.passes.fsdp.experts import shard_experts
from moetx.passes.fsdp.options import DTYPE, DTYPES, RESHARD, ROLES, roles
from moetx.passes.fsdp.prefetch import set_prefetch, unit_orders
from moetx.passes.fsdp.reshard import (
    AUTO,
    MIN_UNIT_BYTES,
    block_groups,
    choose_resident,
    joining_root,
    nested_units,
)
from moetx.passes.fsdp.root import require_callers_root
from moetx.passes.load_sync import sync_routing_load
from moetx.structure.discovery import discover


@register_pass("fsdp")
@typing.final
@attrs.frozen(kw_only=True, repr=False)
class FSDP(Pass):
    """Shard parameters, gradients and optimizer state with FSDP2 (`fully_shard`).

    Stage `fsdp`: last in a pipeline (after cp, ep, ac). Units, innermost first:

    - routed experts of each MoE layer, if `ExpertParallel` sharded them (read from the model's
      record, not from flags): sharded over the ranks that hold the same experts
      (`ParallelMesh.expert_fsdp_mesh`: ep_shard, x dp_replicate), on dim 0, or dim 1 when
      there are more shards than local experts (no padding). Their gradient divide factor is
      the world size, so expert gradients have the same global-mean scale as dense ones
      (without it they come out ep x too large: pytorch#160285);
    - the router of each MoE layer, with an fp32 policy, when `param_dtype` is low precision
      and `"router"` is in `fp32_modules` (as Megatron's router dtype option);
    - each transformer block (backbone and MTP), over dp_shard x cp (HSDP with dp_replicate);
      consecutive blocks share one unit while it gathers fewer than `min_unit_bytes`;
    - the input embedding and the lm head (unless tied: tied weights stay with the root), each
      unless it gathers to fewer than `min_unit_bytes` (then it joins the root unit; not under
      tensor parallelism, nor for an fp32 lm head or an `output_dtype` other than `param_dtype`);
    - the root (final norm and everything left), unless `wrap_root=False`.

    Frozen parameters (`requires_grad=False`) stay frozen. Routing-load counters (aux-loss-free
    balancing) are summed over every data and context-parallel rank after each forward.
    `apply` consumes its input (FSDP2 swaps module classes in place).

    Preconditions (checked before anything changes, each a `PassPreconditionError`): the
    blocks are discoverable; the model holds no parallelism from outside moetx (no torch
    `fully_shard` unit, no DTensor parameter but the experts `ExpertParallel` sharded); an int
    `reshard_after_forward` divides every unit's shard group (FSDP2's rule); every unit's
    parameters share one dtype (FSDP2 only checks that at the first forward); an
    `output_dtype` reaches no unit that does not cast its inputs back (without `param_dtype`,
    or the tied lm head in the root: both failed at the first forward); with
    `wrap_root=False`, every parameter lands in a unit and the embeddings are not tied.

    Args:
        param_dtype: Dtype parameters are all-gathered in for compute (None: keep).
        reduce_dtype: Dtype gradients are reduced in (None: `param_dtype`).
        output_dtype: Dtype of unit outputs (None: no cast).
        fp32_modules: Roles kept in fp32 under a low `param_dtype`: "router", "lm_head".
        reshard_after_forward: `"auto"` (the default): each unit decides, so that it is
            all-gathered once per step when memory allows: the root always stays gathered
            from forward to backward, and the other units too, in backward order, while the
            bytes they keep gathered fit the rank's sharded parameters + gradients + AdamW
            state (`moetx.passes.fsdp.reshard`: every unit up to 4 shards in fp32); the rest
            reshard. `plan` reports the bytes kept (`resident_after_forward`) and the units;
            `predict` / `autoplan` model it. Or FSDP2's option for every unit: free gathered
            params after forward (True: two all-gathers per unit and step, the least memory;
            on a tight budget), keep them (False; more memory, less communication), or
            reshard to a smaller group of this size (an int >= 2 that divides every unit's
            shard group; checked per unit mesh). The ints 0 and 1 are refused: `1 == True` in
            Python, but FSDP2 reads the int 1 as False.
        min_unit_bytes: Units that gather to fewer bytes merge (see above); 1 MiB (`1 << 20`)
            by default: below about 1 MiB an all-gather or reduce-scatter costs its latency, not
            its bytes (on NCCL and gloo), so each unit fewer saves one of each per step for
            free, while a real model's block (tens of MiB) stays a unit of its own. On issue
            17's workload (2 ranks, EP | FSDP) it makes 24 collectives per step instead of 34.
            0: never merge (one unit per block, embedding and lm head units of their own).
        prefetch: Each unit starts the all-gathers of the next `prefetch` units (forward and
            backward order; the units nested in a block, such as the routed experts on the
            expert mesh, included), so they run while it computes (`moetx.passes.fsdp.prefetch`;
            the collectives stay the same). 1 by default (measured on issue 17's workload,
            prefetch on / off: 0.84-0.99 of the step time where units are all-gathered again
            in backward, within noise where "auto" keeps them; 2 no better than 1); 0: FSDP2's
            own order.
        cpu_offload: Keep sharded parameters, gradients and optimizer state on the CPU.
        wrap_root: Also make the root module an FSDP unit (otherwise only the final norm; the
            caller then `fully_shard`s a module above the model, or its forward raises).

    Example:
        >>> FSDP(param_dtype="bfloat16", reduce_dtype="float32")
        FSDP(param_dtype='bfloat16', reduce_dtype='float32')
    """

    placement = Placement.builtin("fsdp")

    param_dtype: str | None = option(None, DTYPE)
    reduce_dtype: str | None = option(None, DTYPE)
    output_dtype: str | None = option(None, DTYPE)
    fp32_modules: tuple[str, ...] = option(("router",), ROLES, converter=roles)
    reshard_after_forward: bool | int | str = option("auto", RESHARD)
    min_unit_bytes: int = option(MIN_UNIT_BYTES, at_least(0))
    prefetch: int = option(1, at_least(0))
    cpu_offload: bool = option(False, flag())
    wrap_root: bool = option(True, flag())

    def check(self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]) -> None:
        """Every precondition above, before anything changes (`moetx.passes.fsdp.checks`)."""
        check_fsdp(self, model, mesh, record)

    def _policy(self, *, fp32: bool = False) -> MixedPrecisionPolicy:
        if fp32 and self.param_dtype not in (None, "float32"):
            return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        dt = {d: getattr(torch, d) for d in DTYPES}
        return MixedPrecisionPolicy(
            param_dtype=dt.get(self.param_dtype or ""),
            reduce_dtype=dt.get(self.reduce_dtype or ""),
            output_dtype=dt.get(self.output_dtype or ""),
        )

    def _offload(self) -> OffloadPolicy:
        # pin_memory needs an accelerator: the default fails on CPU-only builds (notes §4.3).
        pinned = torch.cuda.is_available()
        return CPUOffloadPolicy(pin_memory=pinned) if self.cpu_offload else OffloadPolicy()

    def _apply(
        self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]
    ) -> nn.Module:
        s = discover(model)
        dense = mesh.dense_fsdp_mesh()
        kept: frozenset[int] = frozenset()
        # the unit orders before sharding (afterwards every parameter is a DTensor)
        orders = unit_orders(model, s, self, record) if self.prefetch else None
        if self.reshard_after_forward == AUTO:
            modules = dict(model.named_modules())
            kept_units = choose_resident(model, self, mesh.degrees, record).kept_units
            kept = frozenset(id(modules[n]) for n in kept_units)

        def shard(*modules: nn.Module, fp32: bool = False) -> None:
            one = modules[0] if len(modules) == 1 else list(modules)  # several: one unit
            common = self._common(modules[0], kept)
            fully_shard(one, mesh=dense, mp_policy=self._policy(fp32=fp32), **common)

        for group in block_groups(model, s, self, record):
            for block in group:
                for unit in nested_units(block, self, record):
                    if block.moe is not None and unit is block.moe.experts:
                        policy, common = self._policy(), self._common(unit, kept)
                        shard_experts(unit, block.moe.num_experts, mesh, policy, common)
                    else:
                        shard(unit, fp32=True)  # the router
            shard(*(b.module for b in group))
            for block in group if find_applied(record, "compile") else ():
                drive_nested_units(block.module)  # nested units outside the compiled forward
        if not s.tied_embeddings:
            joined = joining_root(model, s, self, record)
            if not any(s.embedding is j for j in joined):
                shard(s.embedding)
            if s.lm_head is not None and not any(s.lm_head is j for j in joined):
                shard(s.lm_head, fp32="lm_head" in self.fp32_modules)
        sync_routing_load(model, mesh)  # counters count every token rank's tokens (load_sync)
        if self.wrap_root:
            shard(model)
        elif s.final_norm is not None:
            shard(s.final_norm)
        if not self.wrap_root:  # a root the caller makes must initialise the units
            require_callers_root(model)
        if orders is not None:
            gloo = dist.get_backend(mesh.tokens.get_group()) == "gloo"
            set_prefetch(*orders, self.prefetch, async_op=gloo, root_first=self.wrap_root)
        return model

    def _common(self, module: nn.Module, kept: frozenset[int]) -> dict[str, Any]:
        raf = self.reshard_after_forward
        return {
            # "auto": False (keep gathered) for the units `choose_resident` keeps
            "reshard_after_forward": id(module) not in kept if raf == AUTO else raf,
            "offload_policy": self._offload(),
        }

    def facts(self, model: nn.Module, mesh: ParallelMesh) -> Mapping[str, Any]:
        """The dense and expert FSDP degrees and, under "auto", what stays gathered."""
        d = mesh.degrees
        out: dict[str, Any] = {
            "dense_degree": d.dp_replicate * d.dp_shard_cp,
            "expert_degree": d.dp_replicate * d.ep_shard,
        }
        if self.reshard_after_forward == AUTO:
            out["resident"] = choose_resident(model, self, d, applied_passes(model))
        return out
