"""The core algebra: `Pass`, the abstract transform, and `Pipeline`, an order-checked sequence of them.

Contract: `pass_.apply(model, mesh) -> model`. `apply` first checks every precondition and
raises a typed `MoetxError` without touching the model; only then does it transform. The
transform may mutate `model` in place (FSDP2 does), so `apply` *consumes* its input: use the
returned model, which carries the record of what was applied (`moetx.core.record`).

`|` means *sequencing* here (as in a shell pipe), not alternatives as in hypothesis:
`cp | ep | ac | fsdp` applies context parallelism first and FSDP last. The order is checked
when the pipeline is built, so a wrong order fails in the line that wrote it.
"""

from __future__ import annotations

import abc
import ast
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, final

import attrs
from torch import nn

from moetx.core import seams
from moetx.core.errors import DuplicatePassError, PipelineError, PipelineOrderError
from moetx.core.options import check_options, unknown_options
from moetx.core.order import Placement, chain_text, precedence, stable_sort
from moetx.core.record import (
    Applied,
    applied_passes,
    check_not_failed,
    check_record_admits,
    mark_failed,
    set_record,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from moetx.mesh.parallel_mesh import ParallelMesh


class Pass(abc.ABC):
    """A parallelism transform: immutable data plus `apply(model, mesh) -> model`.

    Subclasses are `@attrs.frozen(kw_only=True)` classes holding plain data only (never a mesh
    or a module), declare a class-level `placement` (their stage and ordering rules), implement
    `_apply`, and may override `check` (preconditions) and `facts` (what later passes may read).
    `apply` consumes `model`: use the returned module.
    """

    placement: ClassVar[Placement]

    def __attrs_post_init__(self) -> None:
        """Check every option (`moetx.core.options`): all bad fields in one `PassOptionError`."""
        check_options(self)

    def apply(self, model: nn.Module, mesh: ParallelMesh | DeviceMesh) -> nn.Module:
        """Check every precondition, then transform `model` and record this pass on it."""
        pmesh = seams.coerce_mesh(mesh)
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
        set_record(out, (*record, Applied(self, facts)))
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
        if isinstance(other, (Pass, Pipeline)):
            return Pipeline((self,)) | other
        return NotImplemented


P = TypeVar("P", bound=Pass)


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
        pmesh = seams.coerce_mesh(mesh)
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
        pmesh = seams.coerce_mesh(mesh)
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
        return seams.run_planner(self, model, mesh, rank=rank)

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        """Build a pipeline from text such as `"cp|ep(dispatcher='all_gather')|ac|fsdp"`.

        Each step is a registered pass name (`registered_passes()`: the built-ins are `cp`,
        `ep`, `ac`, `fsdp`), optionally called with keyword options whose values are Python
        literals. The result is checked like any pipeline (order, duplicates).

        Example:
            >>> Pipeline.parse("ep | ac(mode='full') | fsdp")
            ExpertParallel() | ActivationCheckpoint(mode='full') | FSDP()
        """
        try:
            tree = ast.parse(text.strip() or "None", mode="eval").body
        except SyntaxError:
            raise PipelineError(
                _parse_help(text, "it is not `name|name(option=value)|...`")
            ) from None
        steps: list[ast.expr] = []
        while isinstance(tree, ast.BinOp) and isinstance(tree.op, ast.BitOr):
            steps.insert(0, tree.right)
            tree = tree.left
        steps.insert(0, tree)
        if len(steps) == 1 and isinstance(tree, ast.Constant) and tree.value is None:
            return cls()
        return cls(tuple(_parse_step(text, step) for step in steps))

    def _step_note(self, i: int, p: Pass, doing: str) -> str:
        return f"while {doing} step {i}/{len(self.passes)}: {p!r}\n  pipeline: {self!r}"


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(name: str) -> Callable[[type[P]], type[P]]:
    """Class decorator: make `Pipeline.parse` understand `name` (and `name(option=value)`)."""

    def register(cls: type[P]) -> type[P]:
        known = _REGISTRY.get(name)
        redefined = known is not None and (known.__module__, known.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )  # the same class defined again (a re-run notebook cell): the new one replaces it
        if known is not None and known is not cls and not redefined:
            raise PipelineError(
                f"the pass name {name!r} is taken by `{known.__qualname__}`; "
                f"register `{cls.__qualname__}` under another name."
            )
        _REGISTRY[name] = cls
        return cls

    return register


def registered_passes() -> dict[str, type[Pass]]:
    """The pass names `Pipeline.parse` understands, and their classes."""
    return dict(_REGISTRY)


def _parse_help(text: str, why: str) -> str:
    return (
        f"cannot parse the pipeline {text!r}: {why}.\n"
        f"  fix: join pass names from {tuple(_REGISTRY)} with '|', options as keyword "
        "literals, e.g. \"ep(dispatcher='all_gather') | ac | fsdp\"."
    )


def _parse_step(text: str, node: ast.expr) -> Pass:
    call = node if isinstance(node, ast.Call) else None
    name_node = call.func if call is not None else node
    if not isinstance(name_node, ast.Name):
        raise PipelineError(_parse_help(text, f"{ast.unparse(node)!r} is not a pass name"))
    cls = _REGISTRY.get(name_node.id)
    if cls is None:
        raise PipelineError(_parse_help(text, f"{name_node.id!r} is not a registered pass"))
    if call is None:
        return cls()
    if call.args or any(k.arg is None for k in call.keywords):
        raise PipelineError(_parse_help(text, f"options of {name_node.id!r} must be keywords"))
    unknown_options(cls, [k.arg for k in call.keywords if k.arg])
    try:
        options = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
    except ValueError:
        raise PipelineError(
            _parse_help(text, f"options of {name_node.id!r} must be Python literals")
        ) from None
    return cls(**options)
