"""`Pass`: the abstract parallelism transform, and the record a model keeps of applied passes.

Contract: `pass_.apply(model, mesh) -> model`. `apply` first checks every precondition and
raises a typed `MoetxError` without touching the model; only then does it transform. The
transform may mutate `model` in place (FSDP2 does), so `apply` *consumes* its input: use the
returned model. The returned model carries a record (`applied_passes`) of what was applied,
with which configuration, so applying a pass twice or out of order is caught, and later passes
read what earlier ones did (FSDP learns which parameters expert parallelism owns) from it.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from torch import nn

from moetx._errors import PartiallyAppliedModelError, PassAlreadyAppliedError, PipelineOrderError
from moetx._order import Placement, precedence

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from moetx._mesh import ParallelMesh
    from moetx._pipeline import Pipeline

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


def _set_record(model: nn.Module, record: tuple[Applied, ...]) -> None:
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
    from moetx._order import stable_sort

    stages = [x.placement.stage for x in passes]
    return " | ".join(repr(passes[i]) for i in stable_sort(stages, must_precede))


class Pass(abc.ABC):
    """A parallelism transform: immutable data plus `apply(model, mesh) -> model`.

    Subclasses are `@attrs.frozen(kw_only=True)` classes holding plain data only (never a mesh
    or a module), declare a class-level `placement` (their stage and ordering rules), implement
    `_apply`, and may override `check` (preconditions) and `facts` (what later passes may read).
    `apply` consumes `model`: use the returned module.
    """

    placement: ClassVar[Placement]

    def apply(self, model: nn.Module, mesh: ParallelMesh | DeviceMesh) -> nn.Module:
        """Check every precondition, then transform `model` and record this pass on it."""
        from moetx._mesh import as_parallel_mesh

        pmesh = as_parallel_mesh(mesh)
        self.validate(model, pmesh, applied_passes(model))
        return self.apply_unchecked(model, pmesh)

    def validate(self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]) -> None:
        """Run every check for applying to `model` after `record`; never touches the model."""
        check_not_failed(model)
        check_record_admits(self, record)
        self.check(model, mesh, record)

    def apply_unchecked(self, model: nn.Module, mesh: ParallelMesh) -> nn.Module:
        """Transform and record, assuming `validate` passed (used by `Pipeline.apply`)."""
        record = applied_passes(model)
        try:
            out = self._apply(model, mesh, record)
            facts = self.facts(out, mesh)
        except BaseException:
            mark_failed(model, f"`{type(self).__name__}.apply`")
            raise
        _set_record(out, (*record, Applied(self, facts)))
        return out

    def check(self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]) -> None:  # noqa: B027
        """Raise a typed `MoetxError` if this pass cannot apply; must not mutate anything.

        Args:
            model: The model as it will be when this pass runs (earlier pipeline passes are
                listed in `record` but, during a pipeline's up-front check, not yet applied).
            mesh: The parallel mesh.
            record: Passes applied (or planned) before this one.
        """

    @abc.abstractmethod
    def _apply(
        self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]
    ) -> nn.Module:
        """Transform `model` (preconditions already hold) and return it."""

    def facts(self, model: nn.Module, mesh: ParallelMesh) -> Mapping[str, Any]:
        """Facts about what this pass did, stored in the model's record for later passes."""
        return {}

    def __repr__(self) -> str:
        """Valid Python showing only the fields that differ from their defaults: `FSDP()`.

        Concrete passes opt in with `@attrs.frozen(kw_only=True, repr=False)`.
        """
        if not attrs.has(type(self)):
            return super().__repr__()
        parts = []
        for f in attrs.fields(type(self)):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            default: Any = f.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                default = default.factory()
            if f.repr and (default is attrs.NOTHING or value != default):
                parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def __or__(self, other: object) -> Pipeline:
        from moetx._pipeline import Pipeline

        if isinstance(other, (Pass, Pipeline)):
            return Pipeline((self,)) | other
        return NotImplemented
