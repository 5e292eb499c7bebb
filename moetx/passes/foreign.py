"""Refuse models parallelized outside moetx: torch `fully_shard` units, DTensor parameters.

moetx places every DTensor itself and reads what it placed from the model's record; a model
that arrives already sharded would pass the passes' own checks and then fail inside torch,
half-transformed ("Cannot concatenate overlapping meshes"). Every built-in pass calls
`refuse_foreign_parallelism` from its `check`.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from moetx.core.errors import PassPreconditionError
from moetx.core.record import Applied, find_applied

__all__ = ["refuse_foreign_parallelism"]


def refuse_foreign_parallelism(model: nn.Module, record: tuple[Applied, ...], *, by: str) -> None:
    """Raise `PassPreconditionError` if `model` holds parallelism moetx's record does not explain.

    That is any `fully_shard` unit (moetx's `FSDP` is the last stage, so none may exist yet),
    or any DTensor parameter other than those a recorded `ExpertParallel` (its `expert_params`
    fact) or `TensorParallel` (its `params` fact) placed.
    """
    name = type(model).__name__
    for fqn, module in model.named_modules():
        if isinstance(module, FSDPModule):
            where = f"module `{fqn}`" if fqn else "the root module"
            raise PassPreconditionError(
                f"`{by}` cannot transform `{name}`: it was already sharded by torch's "
                f"`fully_shard` ({where}), outside moetx.\n"
                "  fix: give moetx the model before `fully_shard` and let the pipeline shard it, "
                "e.g. `(ExpertParallel() | FSDP()).apply(model, mesh)`."
            )
    ep, tp = find_applied(record, "ep"), find_applied(record, "tp")
    owned = set(ep.facts.get("expert_params", ())) if ep is not None else set()
    owned |= set(tp.facts.get("params", ())) if tp is not None else set()
    for fqn, p in model.named_parameters():
        if isinstance(p, DTensor) and fqn not in owned:
            raise PassPreconditionError(
                f"`{by}` cannot transform `{name}`: its parameter `{fqn}` is already a DTensor, "
                "placed outside moetx.\n"
                "  fix: give moetx a model with plain tensor parameters; its passes place every "
                "DTensor themselves (experts with `ExpertParallel`, heads and MLPs with `TensorParallel`, "
                "the rest with `FSDP`)."
            )
