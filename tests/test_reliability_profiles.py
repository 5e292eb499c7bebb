"""Hypothesis profiles: `ci` repeats itself (derandomized); `nightly` sees new examples each run."""

from __future__ import annotations

import pytest
from hypothesis import settings

from moetx.testing import examples
from moetx.testing.profiles import PROFILES, load_profile


@pytest.fixture
def restore_profile():
    current = settings.get_current_profile_name()
    yield
    settings.load_profile(current)


def test_nightly_draws_fresh_examples_and_ci_stays_derandomized(restore_profile):
    """`HYPOTHESIS_PROFILE=nightly`: full's budget, `derandomize=False`; ci unchanged."""
    assert "nightly" in PROFILES
    assert load_profile("nightly") == "nightly"
    assert settings.default.derandomize is False
    assert settings.default.max_examples == 500
    assert examples(10) == 50
    load_profile("ci")
    assert settings.default.derandomize is True
    assert settings.default.max_examples == 100
    assert examples(10) == 10


def test_an_unknown_profile_names_the_known_ones(restore_profile):
    """A typo in `$HYPOTHESIS_PROFILE` lists the profiles, nightly included."""
    with pytest.raises(ValueError, match=r"must be one of \['ci', 'dev', 'full', 'nightly'\]"):
        load_profile("nighty")
