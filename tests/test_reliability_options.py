"""Pass options are validated when a pass is built: every bad field at once, one typed error.

`PassOptionError` is a `MoetxError`, a `ValueError` and a `TypeError` (so either `except` keeps
working); it names each bad field with its value and the values it accepts, then a fix line.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moetx
from moetx import (
    FSDP,
    ActivationCheckpoint,
    ContextParallel,
    ExpertParallel,
    MoetxError,
    PassOptionError,
    Pipeline,
    TensorParallel,
)

ALL_PASSES = (TensorParallel, ContextParallel, ExpertParallel, ActivationCheckpoint, FSDP)
DTYPES = ("float32", "bfloat16", "float16")
ROLES = ("router", "lm_head")


def _not_in(values: tuple[object, ...]) -> st.SearchStrategy[object]:
    return st.one_of(
        st.text(max_size=6).filter(lambda v: v not in values),
        st.integers(-3, 3),
        st.floats(allow_nan=False),
        st.none() if None not in values else st.just(b"x"),
    )


NOT_BOOL = st.one_of(st.integers(-2, 2), st.none(), st.text(max_size=3), st.floats(0, 1))
NOT_AXIS = st.one_of(st.just(""), st.integers(), st.none(), st.booleans())

# (pass, field) -> (valid values, invalid values). Every field of every pass must be here.
FIELDS: dict[tuple[type, str], tuple[st.SearchStrategy[object], st.SearchStrategy[object]]] = {
    (TensorParallel, "axis"): (st.just("tp"), NOT_AXIS),
    (TensorParallel, "sequence_parallel"): (st.booleans(), NOT_BOOL),
    (ContextParallel, "axis"): (st.just("cp"), NOT_AXIS),
    (ContextParallel, "comm"): (
        st.sampled_from(["allgather", "p2p"]),
        _not_in(("allgather", "p2p")),
    ),
    (ContextParallel, "load_balance"): (st.booleans(), NOT_BOOL),
    (ExpertParallel, "axis"): (st.just("ep"), NOT_AXIS),
    (ExpertParallel, "dispatcher"): (
        st.sampled_from(["all_to_all", "all_gather"]),
        _not_in(("all_to_all", "all_gather")),
    ),
    (ExpertParallel, "dedup"): (st.booleans(), NOT_BOOL),
    (ActivationCheckpoint, "mode"): (
        st.sampled_from(["full", "router", "selective"]),
        _not_in(("full", "router", "selective")),
    ),
    (ActivationCheckpoint, "every"): (
        st.integers(1, 8),
        st.one_of(st.integers(max_value=0), st.booleans(), st.floats(1, 4), st.text(max_size=2)),
    ),
    (FSDP, "param_dtype"): (st.sampled_from([None, *DTYPES]), _not_in((None, *DTYPES))),
    (FSDP, "reduce_dtype"): (st.sampled_from([None, *DTYPES]), _not_in((None, *DTYPES))),
    (FSDP, "output_dtype"): (st.sampled_from([None, *DTYPES]), _not_in((None, *DTYPES))),
    (FSDP, "fp32_modules"): (
        st.one_of(st.sampled_from(ROLES), st.lists(st.sampled_from(ROLES), max_size=2).map(tuple)),
        st.one_of(
            st.integers(),
            st.none(),
            st.lists(st.sampled_from([*ROLES, "norm", ""]), min_size=1, max_size=3)
            .filter(lambda v: not set(v) <= set(ROLES))
            .map(tuple),
        ),
    ),
    (FSDP, "reshard_after_forward"): (
        st.one_of(st.booleans(), st.integers(2, 64), st.just("auto")),
        st.one_of(st.integers(-4, 1), st.none(), st.floats(0, 4), st.text(max_size=3)),
    ),
    (FSDP, "min_unit_bytes"): (
        st.integers(0, 2**40),
        st.one_of(st.integers(max_value=-1), st.booleans(), st.floats(0, 4), st.none()),
    ),
    (FSDP, "prefetch"): (
        st.integers(0, 64),
        st.one_of(st.integers(max_value=-1), st.booleans(), st.floats(0, 4), st.none()),
    ),
    (FSDP, "cpu_offload"): (st.booleans(), NOT_BOOL),
    (FSDP, "wrap_root"): (st.booleans(), NOT_BOOL),
}


@pytest.mark.parametrize("cls", ALL_PASSES, ids=lambda c: c.__name__)
def test_every_option_is_in_the_table(cls):
    """A new option must come with valid and invalid values here."""
    assert {f.name for f in attrs.fields(cls)} == {n for c, n in FIELDS if c is cls}


@st.composite
def options(draw: st.DrawFn) -> tuple[type, dict[str, object], list[str]]:
    """A pass class, keyword options for some of its fields, and the names drawn invalid."""
    cls = draw(st.sampled_from(ALL_PASSES))
    kwargs: dict[str, object] = {}
    bad: list[str] = []
    for f in attrs.fields(cls):
        choice = draw(st.sampled_from(["default", "valid", "invalid"]))
        if choice == "default":
            continue
        valid, invalid = FIELDS[(cls, f.name)]
        kwargs[f.name] = draw(invalid if choice == "invalid" else valid)
        if choice == "invalid":
            bad.append(f.name)
    return cls, kwargs, bad


@given(options())
def test_every_bad_option_is_reported_at_once(drawn):
    """Valid options build a pass; any invalid ones raise one `PassOptionError` naming each."""
    cls, kwargs, bad = drawn
    if not bad:
        p = cls(**kwargs)
        assert attrs.evolve(p) == p
        return
    with pytest.raises(PassOptionError) as info:
        cls(**kwargs)
    err = info.value
    assert isinstance(err, MoetxError) and isinstance(err, ValueError)
    assert isinstance(err, TypeError)
    lines = str(err).splitlines()
    assert [line.split("`")[1] for line in lines[:-1]] == [f"{cls.__name__}.{n}" for n in bad]
    assert len(err.problems) == len(bad)
    assert lines[-1].startswith(f"  fix: use allowed values, e.g. the defaults: `{cls.__name__}(")
    # the same through evolve, from a valid pass
    with pytest.raises(PassOptionError) as again:
        attrs.evolve(cls(), **kwargs)
    assert str(again.value) == str(err)


PINNED = [
    (
        lambda: ExpertParallel(dispatcher="x"),
        r"^`ExpertParallel\.dispatcher` \('x'\) must be one of 'all_to_all', 'all_gather'\.\n"
        r"  fix: use allowed values, e.g. the defaults: `ExpertParallel\(dispatcher='all_to_all'\)`\.$",
    ),
    (
        lambda: ExpertParallel(dedup="yes"),
        r"^`ExpertParallel\.dedup` \('yes'\) must be True or False\.\n"
        r"  fix: use allowed values, e\.g\. the defaults: `ExpertParallel\(dedup=False\)`\.$",
    ),
    (
        lambda: ActivationCheckpoint(mode=3),
        r"^`ActivationCheckpoint\.mode` \(3\) must be one of 'full', 'router', 'selective'\.\n",
    ),
    (
        lambda: FSDP(param_dtype="fp7"),
        r"^`FSDP\.param_dtype` \('fp7'\) must be one of None, 'float32', 'bfloat16', "
        r"'float16'\.\n",
    ),
    (
        lambda: ContextParallel(comm="ring"),
        r"^`ContextParallel\.comm` \('ring'\) must be one of 'allgather', 'p2p'\.\n",
    ),
    (
        lambda: ActivationCheckpoint(every=0),
        r"^`ActivationCheckpoint\.every` \(0\) must be an int >= 1\.\n",
    ),
    (
        lambda: ContextParallel(load_balance=1),
        r"^`ContextParallel\.load_balance` \(1\) must be True or False\.\n",
    ),
    (
        lambda: FSDP(fp32_modules=("router", "norm")),
        r"^`FSDP\.fp32_modules` \(\('router', 'norm'\)\) must be a tuple of roles from "
        r"\('router', 'lm_head'\)\.\n",
    ),
    (
        lambda: ActivationCheckpoint(mode="sometimes", every=0),
        r"^`ActivationCheckpoint\.mode` \('sometimes'\) must be one of 'full', 'router', "
        r"'selective'\.\n`ActivationCheckpoint\.every` \(0\) must be an int >= 1\.\n"
        r"  fix: use allowed values, e.g. the defaults: "
        r"`ActivationCheckpoint\(mode='router', every=1\)`\.$",
    ),
]


@pytest.mark.parametrize(("build", "message"), PINNED)
def test_option_messages_are_pinned(build, message):
    """The issue's examples: one readable line per bad field, then the fix, never a tuple repr."""
    with pytest.raises(PassOptionError, match=message):
        build()


def test_parse_gives_the_same_option_errors():
    """`Pipeline.parse` raises the pass's own `PassOptionError`, and names unknown options."""
    with pytest.raises(PassOptionError, match=r"^`ExpertParallel\.dispatcher` \('x'\)"):
        Pipeline.parse("ep(dispatcher='x')")
    with pytest.raises(
        PassOptionError,
        match=r"^`ExpertParallel` has no option `degree`; its options: `axis`, `dispatcher`, "
        r"`dedup`\.\n"
        r"  fix: ",
    ):
        Pipeline.parse("ep(degree=2)")


def test_the_error_is_exported():
    """`moetx.PassOptionError` is public and in `__all__`."""
    assert "PassOptionError" in moetx.__all__


@pytest.mark.parametrize("value", [0, 1, -1, 2.0, None, "true"])
def test_reshard_after_forward_takes_a_bool_or_a_group_size(value):
    """Only True, False or an int >= 2: the int 1 compared equal to True (same repr, hash) but
    FSDP2 took it as False, so it is refused with the reason; 0 too."""
    with pytest.raises(
        PassOptionError,
        match=rf"^`FSDP\.reshard_after_forward` \({value!r}\) must be True, False or an int >= 2 "
        r"\(the size of the group to reshard to after forward\), or 'auto' ",
    ) as info:
        FSDP(reshard_after_forward=value)
    if value in (0, 1) and type(value) is int:
        assert f"The int {value} is no group size: FSDP2 would take 1 as False" in str(info.value)


def test_reshard_after_forward_values_are_distinct():
    """`repr`, `==` and `hash` tell every accepted value apart, and round-trip."""
    values = [
        FSDP(reshard_after_forward=True),
        FSDP(),
        FSDP(reshard_after_forward=False),
        FSDP(reshard_after_forward=2),
    ]
    assert [repr(p) for p in values] == [
        "FSDP(reshard_after_forward=True)",
        "FSDP()",
        "FSDP(reshard_after_forward=False)",
        "FSDP(reshard_after_forward=2)",
    ]
    assert len(set(values)) == 4
    assert FSDP(reshard_after_forward="auto") == FSDP()  # the default
    assert hash(FSDP(reshard_after_forward="auto")) == hash(FSDP())
    unit = torch.nn.Linear(1, 1)
    for p in values:
        assert eval(repr(p), {"FSDP": FSDP}) == p
        got = p._common(unit, frozenset())["reshard_after_forward"]  # what FSDP2 gets
        assert got is (True if p.reshard_after_forward == "auto" else p.reshard_after_forward)
