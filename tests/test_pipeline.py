"""Pipeline algebra: order validation, duplicates, `|`, up-front checks, the model's record."""

from __future__ import annotations

import typing

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from moetx.core.algebra import Pass, Pipeline
from moetx.core.errors import (
    DuplicatePassError,
    PartiallyAppliedModelError,
    PassAlreadyAppliedError,
    PassPreconditionError,
    PipelineOrderError,
)
from moetx.core.order import BUILTIN_ORDER, Placement
from moetx.core.record import applied_passes


class _Marking(Pass):
    """Test pass: appends its stage to `model.trace` when applied."""

    def _apply(self, model, mesh, record):
        model.trace.append(self.placement.stage)
        if getattr(self, "explode", False):
            raise RuntimeError("boom")
        return model


@typing.final
@attrs.frozen(kw_only=True)
class Cp(_Marking):
    placement = Placement.builtin("cp")
    degree: int = 1


@typing.final
@attrs.frozen(kw_only=True)
class Ep(_Marking):
    placement = Placement.builtin("ep")
    degree: int = 1


@typing.final
@attrs.frozen(kw_only=True)
class Ac(_Marking):
    placement = Placement.builtin("ac")
    mode: str = "full"


@typing.final
@attrs.frozen(kw_only=True)
class Fsdp(_Marking):
    placement = Placement.builtin("fsdp")
    explode: bool = False

    def check(self, model, mesh, record):
        if getattr(model, "refuse_fsdp", False):
            raise PassPreconditionError("`model` refuses FSDP.")


@typing.final
@attrs.frozen(kw_only=True)
class Compile(_Marking):
    """A user-defined pass that must sit after AC and before FSDP."""

    placement = Placement("compile", after={"ac"}, before={"fsdp"})


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.trace: list[str] = []


BUILTINS = {"cp": Cp, "ep": Ep, "ac": Ac, "fsdp": Fsdp}


def passes():
    return st.one_of(
        st.builds(Cp, degree=st.sampled_from([1, 2])),
        st.builds(Ep, degree=st.sampled_from([1, 2, 4])),
        st.builds(Ac, mode=st.sampled_from(["full", "router"])),
        st.builds(Fsdp),
    )


@st.composite
def ordered_lists(draw):
    ps = draw(st.lists(passes(), max_size=4, unique_by=lambda p: p.placement.stage))
    return sorted(ps, key=lambda p: BUILTIN_ORDER.index(p.placement.stage))


@given(st.lists(passes(), max_size=6))
def test_accepts_exactly_the_strictly_ordered_lists(ps):
    """A pass list is valid iff its stages strictly increase along tp -> cp -> ep -> ac -> compile -> fsdp."""
    ranks = [BUILTIN_ORDER.index(p.placement.stage) for p in ps]
    if ranks == sorted(set(ranks)):
        assert Pipeline(ps).passes == tuple(ps)
    else:
        with pytest.raises((PipelineOrderError, DuplicatePassError)):
            Pipeline(ps)


@given(ordered_lists(), st.integers(0, 4), st.integers(0, 4))
def test_grouping_does_not_matter(ps, i, j):
    """`|` is associative, flattens, and agrees with the constructor."""
    i, j = sorted((min(i, len(ps)), min(j, len(ps))))
    a, b, c = Pipeline(ps[:i]), Pipeline(ps[i:j]), Pipeline(ps[j:])
    assert (a | b) | c == a | (b | c) == Pipeline(ps)
    if len(ps) >= 2:
        chained = ps[0]
        for p in ps[1:]:
            chained = chained | p
        assert chained == Pipeline(ps)


@given(ordered_lists())
def test_repr_round_trips(ps):
    """`eval(repr(pipeline)) == pipeline` for every valid pipeline."""
    pipe = Pipeline(ps)
    env = {**{c.__name__: c for c in BUILTINS.values()}, "Pipeline": Pipeline}
    assert eval(repr(pipe), env) == pipe


@given(st.permutations(["cp", "ep", "ac", "fsdp"]))
def test_a_wrong_order_names_both_passes_the_rule_and_the_fix(order):
    """The error names the two passes, shows the rule and the reordered pipeline."""
    ps = [BUILTINS[s]() for s in order]
    if order == ["cp", "ep", "ac", "fsdp"]:
        Pipeline(ps)
        return
    with pytest.raises(PipelineOrderError) as err:
        Pipeline(ps)
    msg = str(err.value)
    assert "required: tp -> cp -> ep -> ac -> compile -> fsdp, each at most once" in msg
    assert "reordered: Cp(degree=1) | Ep(degree=1) | Ac(mode='full') | Fsdp(explode=False)" in msg
    assert len(err.value.problems) >= 1


def test_order_error_message_is_pinned():
    """The exact wording of the most common mistake."""
    with pytest.raises(
        PipelineOrderError,
        match=r"(?s)^`Ac` must come after `Ep`\.\n"
        r"  pipeline: Ac\(mode='full'\) \| Ep\(degree=2\)\n"
        r"  required: tp -> cp -> ep -> ac -> compile -> fsdp, each at most once\n"
        r"  reordered: Ep\(degree=2\) \| Ac\(mode='full'\)$",
    ):
        Ac() | Ep(degree=2)


def test_duplicates_are_rejected_with_their_steps():
    """A stage appearing twice is a `DuplicatePassError` naming the steps."""
    with pytest.raises(
        DuplicatePassError,
        match=r"^`Ep` appears 2 times \(steps 2 and 3\); each parallelism is applied at most once\.",
    ):
        Cp() | Ep(degree=2) | Ep(degree=4)


def test_every_problem_is_reported_at_once():
    """Two inversions produce two problems in one error."""
    with pytest.raises(PipelineOrderError) as err:
        Pipeline([Fsdp(), Ac(), Ep()])
    assert len(err.value.problems) == 3


def test_bad_operands():
    """Only passes and pipelines compose; anything else is Python's TypeError."""
    with pytest.raises(TypeError):
        Ep() | 3  # type: ignore[operator]
    with pytest.raises(TypeError, match=r"holds `moetx\.Pass` values only"):
        Pipeline([Ep(), "fsdp"])  # type: ignore[list-item]


def test_a_user_pass_declares_its_place_without_editing_moetx():
    """`Compile` (after ac, before fsdp) is accepted there and rejected elsewhere."""
    Ep() | Ac() | Compile() | Fsdp()
    Ep() | Compile()  # ac absent: compile still comes after ep (transitively)
    with pytest.raises(PipelineOrderError, match=r"^`Compile` must come after `Ep`\."):
        Compile() | Ep()
    with pytest.raises(PipelineOrderError, match=r"^`Fsdp` must come after `Compile`\."):
        Fsdp() | Compile()
    with pytest.raises(
        PipelineOrderError, match="required: tp -> cp -> ep -> ac -> compile -> fsdp"
    ):
        Ac() | Fsdp() | Compile()


def test_contradictory_rules_are_an_error():
    """A user placement that contradicts the built-in chain is rejected when composed."""

    @attrs.frozen
    class Weird(_Marking):
        placement = Placement("weird", after={"fsdp"}, before={"cp"})

    with pytest.raises(PipelineOrderError, match="contradict each other"):
        Pipeline([Weird()])


def test_apply_runs_in_order_and_records():
    """Passes run in order; the model records each pass value."""
    m = _Model()
    pipe = Cp() | Ep(degree=2) | Fsdp()
    out = pipe.apply(m, mesh=_FakeMesh())
    assert out.trace == ["cp", "ep", "fsdp"]
    assert [a.pass_ for a in applied_passes(out)] == list(pipe.passes)


def test_a_failing_check_leaves_the_model_untouched():
    """All checks run before any pass applies: nothing is half-applied."""
    m = _Model()
    m.refuse_fsdp = True
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(PassPreconditionError, match="refuses FSDP") as err:
        (Cp() | Ep() | Fsdp()).apply(m, mesh=_FakeMesh())
    assert m.trace == []
    assert applied_passes(m) == ()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert "while checking step 3/3: Fsdp(explode=False)" in err.value.__notes__[0]


def test_an_error_during_apply_keeps_its_type_and_names_the_step():
    """A runtime failure is re-raised as is, with a note naming the step; the model is marked."""
    m = _Model()
    with pytest.raises(RuntimeError, match="boom") as err:
        (Ep() | Fsdp(explode=True)).apply(m, mesh=_FakeMesh())
    assert "while applying step 2/2: Fsdp(explode=True)" in err.value.__notes__[0]
    with pytest.raises(PartiallyAppliedModelError, match=r"failed `Fsdp.apply`"):
        Ac().apply(m, mesh=_FakeMesh())


def test_applying_a_pass_twice_is_an_error():
    """The record catches a second application, one by one or through pipelines."""
    m = Ep().apply(_Model(), _FakeMesh())
    with pytest.raises(
        PassAlreadyAppliedError,
        match=r"^`Ep` was already applied to this model \(as Ep\(degree=1\)\); each parallelism "
        r"is applied at most once\.\n  applied so far: Ep\(degree=1\)$",
    ):
        Ep(degree=2).apply(m, _FakeMesh())
    with pytest.raises(PassAlreadyAppliedError):
        (Ep() | Fsdp()).apply(m, _FakeMesh())
    assert m.trace == ["ep"]


def test_one_by_one_in_a_wrong_order_is_an_error():
    """Applying EP after FSDP outside a pipeline names the fix."""
    m = Fsdp().apply(_Model(), _FakeMesh())
    with pytest.raises(
        PipelineOrderError,
        match=r"(?s)^`Ep` must be applied before `Fsdp`, which this model already has\.\n"
        r"  applied so far: Fsdp\(explode=False\)\n"
        r"  fix: rebuild the model and apply one pipeline in order, e\.g\. "
        r"`\(Ep\(degree=1\) \| Fsdp\(explode=False\)\)\.apply\(model, mesh\)`\.$",
    ):
        Ep().apply(m, _FakeMesh())
    assert m.trace == ["fsdp"]


def test_one_by_one_equals_the_pipeline():
    """Composition law: a pipeline equals applying its passes by hand in order."""
    a = (Cp() | Ac()).apply(_Model(), _FakeMesh())
    b = Ac().apply(Cp().apply(_Model(), _FakeMesh()), _FakeMesh())
    assert a.trace == b.trace
    assert applied_passes(a) == applied_passes(b)


class _FakeMesh:
    """Stands in for a ParallelMesh in pure-algebra tests (no process group needed)."""


@pytest.fixture(autouse=True)
def _accept_fake_mesh(monkeypatch):
    import moetx.mesh.parallel_mesh as mesh_mod

    real = mesh_mod.as_parallel_mesh
    monkeypatch.setattr(
        mesh_mod, "as_parallel_mesh", lambda m: m if isinstance(m, _FakeMesh) else real(m)
    )
