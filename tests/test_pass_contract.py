"""The contract every built-in pass obeys, run over one table (optax's `_OPTIMIZERS_UNDER_TEST`)."""

from __future__ import annotations

import pickle

import attrs
import pytest
from hypothesis import given

import moetx
from moetx.core.order import BUILTIN_ORDER
from moetx.testing.strategies import passes, pipelines

ALL_PASSES = [
    getattr(moetx, n)
    for n in (
        "TensorParallel",
        "ContextParallel",
        "ExpertParallel",
        "ActivationCheckpoint",
        "Compile",
        "FSDP",
    )
    if hasattr(moetx, n)
]
NAMESPACE = {cls.__name__: cls for cls in ALL_PASSES} | {"Pipeline": moetx.Pipeline}


@pytest.mark.parametrize("cls", ALL_PASSES, ids=lambda c: c.__name__)
def test_pass_class_shape(cls):
    """Each pass is a final, frozen attrs class with a built-in stage and only plain-data fields."""
    assert attrs.has(cls)
    assert issubclass(cls, moetx.Pass)
    assert cls.placement.stage in BUILTIN_ORDER
    assert "stage" in (cls.__doc__ or "").lower(), "the docstring states the pass's stage"
    p = cls()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(p, attrs.fields(cls)[0].name, None)
    for f in attrs.fields(cls):
        assert isinstance(getattr(p, f.name), (str, int, float, bool, tuple, type(None))), f.name


@given(passes())
def test_passes_are_values(p):
    """Hashable, `eval(repr(p)) == p`, `evolve(p) == p`, picklable (it is sent to ranks)."""
    assert eval(repr(p), NAMESPACE) == p
    assert attrs.evolve(p) == p and hash(attrs.evolve(p)) == hash(p)
    assert pickle.loads(pickle.dumps(p)) == p


@given(pipelines())
def test_pipelines_are_values(pipe):
    """Pipelines drawn in order are accepted, round-trip through repr, and pickle."""
    assert eval(repr(pipe), NAMESPACE) == pipe
    assert pickle.loads(pickle.dumps(pipe)) == pipe
    assert [p.placement.stage for p in pipe] == sorted(
        (p.placement.stage for p in pipe), key=BUILTIN_ORDER.index
    )


def test_invalid_field_values_are_rejected():
    """Validators teach: the field, what it must be, the value received."""
    with pytest.raises(ValueError, match=r"`ExpertParallel\.dispatcher` \('ring'\) must be one of"):
        moetx.ExpertParallel(dispatcher="ring")
    with pytest.raises(ValueError, match=r"`ActivationCheckpoint\.mode` \('sometimes'\) must be"):
        moetx.ActivationCheckpoint(mode="sometimes")
    with pytest.raises(
        ValueError, match=r"`ActivationCheckpoint\.every` \(0\) must be an int >= 1\."
    ):
        moetx.ActivationCheckpoint(every=0)
