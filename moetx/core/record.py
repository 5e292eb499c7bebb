"""The record a transformed model keeps of the passes applied to it, and the checks it enables.

A model carries a record (`applied_passes`) of what was applied, with which configuration, so
applying a pass twice or out of order is caught, and later passes read what earlier ones did
(FSDP learns which parameters expert parallelism owns) from it. A model left half-transformed by
a failed apply is marked, and refuses further passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
from torch import nn

from moetx.core.errors import (
    PartiallyAppliedModelError,
    PassAlreadyAppliedError,
    PipelineOrderError,
)
from moetx.core.order import precedence, stable_sort

if TYPE_CHECKING:
    from moetx.core.algebra import Pass

_RECORD_ATTR = "_moetx_applied"
_FAILED_ATTR = "_moetx_failed"


def _copy(mapping: Mapping[str, Any]) -> dict[str, Any]:
    # A private copy (not a MappingProxyType, which cannot be deep-copied or pickled, so a
    # transformed model could not be `copy.deepcopy`-ed). Treat it as read-only.
    return dict(mapping)


@attrs.frozen
class Applied:
    """One entry of a model's record: the pass value and the facts it left for later passes.

    Attributes:
        pass_: The (immutable) pass that was applied, with its configuration.
        facts: Facts the pass published (read-only by convention), e.g. the expert parameter names it sharded.
    """

    pass_: Pass
    facts: Mapping[str, Any] = attrs.field(factory=dict, converter=_copy, eq=False)


def applied_passes(model: nn.Module) -> tuple[Applied, ...]:
    """Return the record of passes applied to `model`, oldest first (empty for a plain model)."""
    return tuple(model.__dict__.get(_RECORD_ATTR, ()))


def find_applied(record: tuple[Applied, ...], stage: str) -> Applied | None:
    """Return the record entry of `stage`, or None if no pass of that stage was applied."""
    for entry in record:
        if entry.pass_.placement.stage == stage:
            return entry
    return None


def set_record(model: nn.Module, record: tuple[Applied, ...]) -> None:
    # Stored in __dict__ directly: it is metadata, not a submodule, buffer or parameter, and it
    # survives FSDP2's in-place class swap.
    model.__dict__[_RECORD_ATTR] = record


def mark_failed(model: nn.Module, what: str) -> None:
    """Mark `model` as left half-transformed by a failed `apply` (see `check_not_failed`)."""
    model.__dict__[_FAILED_ATTR] = what


def check_not_failed(model: nn.Module) -> None:
    """Raise `PartiallyAppliedModelError` if a previous apply failed midway on `model`."""
    what = model.__dict__.get(_FAILED_ATTR)
    if what is not None:
        raise PartiallyAppliedModelError(
            f"`{type(model).__name__}` was left partly transformed by a failed {what}.\n"
            "  fix: rebuild the model (or reload it from a checkpoint) and apply again."
        )


def check_record_admits(p: Pass, record: tuple[Applied, ...]) -> None:
    """Raise if `p` cannot be applied to a model whose record is `record`.

    Raises:
        PassAlreadyAppliedError: a pass of the same stage is already recorded.
        PipelineOrderError: a recorded pass must come after `p`.
    """
    stage = p.placement.stage
    same = find_applied(record, stage)
    if same is not None:
        raise PassAlreadyAppliedError(
            f"`{type(p).__name__}` was already applied to this model (as {same.pass_!r}); "
            "each parallelism is applied at most once.\n"
            f"  applied so far: {_record_text(record)}"
        )
    must_precede = precedence([e.pass_.placement for e in record] + [p.placement])
    later = [e.pass_ for e in record if stage in must_precede[e.pass_.placement.stage]]
    if later:
        names = ", ".join(f"`{type(x).__name__}`" for x in later)
        raise PipelineOrderError(
            f"`{type(p).__name__}` must be applied before {names}, which this model already has.\n"
            f"  applied so far: {_record_text(record)}\n"
            f"  fix: rebuild the model and apply one pipeline in order, e.g. "
            f"`({_pipeline_text([*(e.pass_ for e in record), p], must_precede)}).apply(model, mesh)`."
        )


def _record_text(record: tuple[Applied, ...]) -> str:
    return " | ".join(repr(e.pass_) for e in record) or "(nothing)"


def _pipeline_text(passes: list[Pass], must_precede: dict[str, set[str]]) -> str:
    stages = [x.placement.stage for x in passes]
    return " | ".join(repr(passes[i]) for i in stable_sort(stages, must_precede))
