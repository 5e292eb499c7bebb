"""`Pipeline`: an immutable, order-checked sequence of passes, built with `|`.

`|` means *sequencing* here (as in a shell pipe), not alternatives as in hypothesis:
`cp | ep | ac | fsdp` applies context parallelism first and FSDP last. The order is checked
when the pipeline is built, so a wrong order fails in the line that wrote it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, final

import attrs
from torch import nn

from moetx._errors import DuplicatePassError, PipelineOrderError
from moetx._order import chain_text, precedence, stable_sort
from moetx._pass import Applied, Pass, applied_passes

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from moetx._mesh import ParallelMesh


def _name(p: Pass) -> str:
    return type(p).__name__


def _to_passes(value: Iterable[Pass]) -> tuple[Pass, ...]:
    return tuple(value)


def _check_passes(_: Any, __: Any, passes: tuple[Pass, ...]) -> None:
    bad = [p for p in passes if not isinstance(p, Pass)]
    if bad:
        raise TypeError(
            f"a `Pipeline` holds `moetx.Pass` values only (got {bad[0]!r} of type "
            f"`{type(bad[0]).__name__}`)."
        )
    stages = [p.placement.stage for p in passes]
    text = " | ".join(repr(p) for p in passes)

    duplicates = []
    for stage in dict.fromkeys(stages):
        steps = [i + 1 for i, s in enumerate(stages) if s == stage]
        if len(steps) > 1:
            first = passes[steps[0] - 1]
            where = " and ".join(str(i) for i in steps)
            duplicates.append(
                f"`{_name(first)}` appears {len(steps)} times (steps {where}); "
                "each parallelism is applied at most once."
            )
    try:
        must_precede = precedence(p.placement for p in passes)
    except ValueError as e:
        raise PipelineOrderError(
            f"The passes' ordering rules contradict each other: {e}.\n  pipeline: {text}"
        ) from None
    rule = chain_text(stages, must_precede)
    if duplicates:
        raise DuplicatePassError(
            "\n".join(duplicates) + f"\n  pipeline: {text}\n  required: {rule}, each at most once",
            tuple(duplicates),
        )

    inversions = []
    for j, later in enumerate(passes):
        for earlier in passes[:j]:
            if later.placement.stage in must_precede[earlier.placement.stage]:
                inversions.append(f"`{_name(earlier)}` must come after `{_name(later)}`.")
    if inversions:
        fixed = " | ".join(repr(passes[i]) for i in stable_sort(stages, must_precede))
        raise PipelineOrderError(
            "\n".join(inversions)
            + f"\n  pipeline: {text}\n  required: {rule}, each at most once\n  reordered: {fixed}",
            tuple(inversions),
        )


@final
@attrs.frozen
class Pipeline:
    """An ordered sequence of passes, validated when built; `apply` runs them in order.

    Build with `|` (`ContextParallel() | ExpertParallel() | FSDP()`) or `Pipeline(passes)`.
    `|` flattens and is associative. A wrong order or a duplicate stage raises
    `PipelineOrderError` / `DuplicatePassError` here, never re-sorted silently.

    Example:
        >>> from moetx import ActivationCheckpoint, ExpertParallel
        >>> ExpertParallel() | ActivationCheckpoint()
        ExpertParallel() | ActivationCheckpoint()
    """

    passes: tuple[Pass, ...] = attrs.field(
        default=(), converter=_to_passes, validator=_check_passes
    )

    def __or__(self, other: object) -> Pipeline:
        if isinstance(other, Pipeline):
            return Pipeline(self.passes + other.passes)
        if isinstance(other, Pass):
            return Pipeline((*self.passes, other))
        return NotImplemented

    def __len__(self) -> int:
        return len(self.passes)

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def __repr__(self) -> str:
        if len(self.passes) >= 2:
            return " | ".join(repr(p) for p in self.passes)
        return f"Pipeline({self.passes!r})" if self.passes else "Pipeline()"

    def validate(self, model: nn.Module, mesh: ParallelMesh | DeviceMesh) -> None:
        """Run every pass's checks against `model` and `mesh` without changing either."""
        from moetx._mesh import as_parallel_mesh

        pmesh = as_parallel_mesh(mesh)
        record = applied_passes(model)
        for i, p in enumerate(self.passes, 1):
            try:
                p.validate(model, pmesh, record)
            except Exception as e:
                e.add_note(self._step_note(i, p, "checking"))
                raise
            record = (*record, Applied(p))

    def apply(self, model: nn.Module, mesh: ParallelMesh | DeviceMesh) -> nn.Module:
        """Check every pass against `model` and `mesh`, then apply them in order.

        If any check fails, nothing is applied. An error raised while applying keeps its type
        and gains a note naming the failing step. `apply` consumes `model`: use the result.
        """
        from moetx._mesh import as_parallel_mesh

        pmesh = as_parallel_mesh(mesh)
        self.validate(model, pmesh)
        for i, p in enumerate(self.passes, 1):
            try:
                model = p.apply_unchecked(model, pmesh)
            except Exception as e:
                e.add_note(self._step_note(i, p, "applying"))
                raise
        return model

    def plan(self, model: nn.Module | Any, mesh: Any, *, rank: int = 0) -> Any:
        """Report what this pipeline would do to `model` on `mesh`, without collectives.

        For each parameter group: the passes that handle it, its mesh axes and placements; for
        each rank: bytes of parameters, gradients and AdamW state. `model` may be a module (it
        is copied to `meta`, never touched) or a `moetx.models.MoEConfig`; `mesh` may be
        `MeshDegrees` (a fake world is used, so no process group is needed), a `ParallelMesh`
        or a named `DeviceMesh`. Returns a `moetx.Plan` (printable, with `_repr_markdown_`).
        """
        from moetx._plan import plan

        return plan(self, model, mesh, rank=rank)

    def _step_note(self, i: int, p: Pass, doing: str) -> str:
        return f"while {doing} step {i}/{len(self.passes)}: {p!r}\n  pipeline: {self!r}"
