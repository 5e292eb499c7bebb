"""`compare` reports differences readably; `gradients`/`parameters` use original names and full values."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from moetx.testing import (
    RankPool,
    clean_fqn,
    compare,
    full_tensor,
    gradients,
    missing_gradients,
    parameters,
)
from tests.bodies import selftest as bodies


def test_equal_nested_results_pass() -> None:
    """Equal tensors, nested dicts/lists and a Python-float loss compare equal."""
    grads = {"w": torch.randn(3, 2), "b": torch.arange(3)}
    expected = {"loss": torch.tensor(0.5), "grads": grads, "steps": [torch.ones(2)]}
    actual = {
        "loss": 0.5,
        "grads": {k: v.clone() for k, v in grads.items()},
        "steps": [torch.ones(2)],
    }
    compare(expected, actual)
    compare(expected, {**actual, "loss": 0.5 + 1e-6})  # within atol


def test_a_doubled_gradient_reads_2_00() -> None:
    """A 2x scale bug shows as `norm a/e` 2.00; the whole report is pinned."""
    with pytest.raises(AssertionError) as err:
        compare(
            {"w": torch.tensor([1.0, -2.0]), "b": torch.ones(1)},
            {"w": torch.tensor([2.0, -4.0]), "b": torch.ones(1)},
        )
    assert str(err.value) == (
        "gradients do not match: 1 value mismatch, out of 2 expected (atol=1e-05, rtol=0.0001).\n"
        "  key  mismatched  max_abs   max_rel   norm a/e  worst at  expected  actual\n"
        "  w    2/2         2.00e+00  1.00e+00  2.00      (1,)      -2        -4"
    )


def test_rows_are_sorted_worst_first() -> None:
    """The entry furthest outside the tolerance comes first."""
    expected = {"small": torch.ones(4), "large": torch.ones(4)}
    actual = {"small": torch.ones(4) * 1.01, "large": torch.ones(4) * 3}
    with pytest.raises(AssertionError, match=r"(?s)norm a/e.*\n  large .*\n  small "):
        compare(expected, actual, what="params")


def test_missing_extra_shape_and_dtype_problems_are_listed() -> None:
    """Keys only on one side, shape and dtype mismatches each get a line."""
    expected = {
        "a": torch.zeros(2),
        "b": torch.zeros(3),
        "c": torch.zeros(2, 2),
        "d": torch.zeros(1),
    }
    actual = {
        "a": torch.zeros(2),
        "x": torch.zeros(1),
        "c": torch.zeros(4),
        "d": torch.zeros(1, dtype=torch.float64),
    }
    with pytest.raises(AssertionError) as err:
        compare(expected, actual, what="rank 1 grads")
    assert str(err.value) == (
        "rank 1 grads do not match: 1 shape mismatch, 1 dtype mismatch, 1 missing, 1 extra, "
        "out of 4 expected (atol=1e-05, rtol=0.0001).\n"
        "  missing from actual: b\n"
        "  extra in actual: x\n"
        "  shape: c: expected (2, 2), got (4,)\n"
        "  dtype: d: expected torch.float32, got torch.float64"
    )


def test_nan_never_matches_and_integers_must_be_equal() -> None:
    """NaN is a mismatch even against NaN; integer tensors ignore tolerances."""
    with pytest.raises(AssertionError, match=r"2 value mismatches"):
        compare(
            {"nan": torch.tensor([float("nan")]), "ids": torch.tensor([1, 2])},
            {"nan": torch.tensor([float("nan")]), "ids": torch.tensor([1, 3])},
            atol=10.0,
        )


def test_gradients_strip_checkpoint_wrapper_prefixes() -> None:
    """Names match the unwrapped model; missing grads are zeros and listed by missing_gradients."""
    torch.manual_seed(0)
    first, last = nn.Linear(4, 3), nn.Linear(2, 2)
    plain = nn.Sequential(first, nn.Tanh(), nn.Linear(3, 2), last)
    wrapped = nn.Sequential(checkpoint_wrapper(first), plain[1], checkpoint_wrapper(plain[2]), last)
    assert "0._checkpoint_wrapped_module.weight" in dict(wrapped.named_parameters())
    wrapped[:3](torch.randn(5, 4)).sum().backward()  # the last Linear gets no gradient
    grads = gradients(wrapped)
    assert list(grads) == [name for name, _ in plain.named_parameters()]
    assert missing_gradients(wrapped) == ["3.bias", "3.weight"]
    assert torch.equal(grads["3.weight"], torch.zeros(2, 2))
    assert first.weight.grad is not None
    assert torch.equal(grads["0.weight"], first.weight.grad)
    assert list(parameters(wrapped)) == list(grads)
    assert clean_fqn("_orig_mod.layers.0._fsdp_wrapped_module.w") == "layers.0.w"


def test_full_tensor_returns_a_detached_copy() -> None:
    """Plain tensors pass through as detached copies."""
    t = torch.ones(2, requires_grad=True)
    out = full_tensor(t)
    assert not out.requires_grad and torch.equal(out, t.detach())
    assert out.data_ptr() != t.data_ptr()


def test_fsdp_ranks_match_one_process(pool2: RankPool) -> None:
    """The documented pattern: FSDP2 ranks return full grads/params, the parent compares them."""
    expected = bodies.reference_step(0)
    for rank, actual in enumerate(pool2.run(bodies.fsdp_step, 0)):
        compare(expected, actual, what=f"rank {rank} results")
