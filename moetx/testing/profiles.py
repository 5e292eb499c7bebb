"""Hypothesis profiles for moetx tests (dev/ci/full/nightly) and `examples`, which scales counts.

Pure-Python properties use the profile's `max_examples`; multi-rank properties cost milliseconds to
seconds per example, so they set their own count and scale it with the profile:
`@settings(max_examples=examples(15))`. Hypothesis is imported lazily: it is a test dependency.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["PROFILES", "examples", "load_profile", "nightly_param"]

# Profile -> (max_examples for pure-Python properties, scale for `examples`).
PROFILES: dict[str, tuple[int, float]] = {
    "dev": (10, 0.2),
    "ci": (100, 1.0),
    "full": (500, 5.0),
    "nightly": (500, 5.0),
}
#: Profiles that draw fresh random examples each run (the others repeat the same ones).
RANDOMIZED: frozenset[str] = frozenset({"nightly"})
DEFAULT_PROFILE = "ci"
ENV_VAR = "HYPOTHESIS_PROFILE"


def load_profile(name: str | None = None) -> str:
    """Register the moetx profiles and load one: `name`, else `$HYPOTHESIS_PROFILE`, else `ci`.

    All profiles use `deadline=None` (first torch calls are slow), `print_blob=True`, and
    suppress the `too_slow` and `data_too_large` health checks. All but `nightly` use
    `derandomize=True`, so a run repeats the previous one; `nightly` has `full`'s budget with
    fresh random examples each run (a scheduled job sees new cases over time; `print_blob`
    prints how to reproduce a failure).

    Returns:
        The name of the loaded profile.

    Raises:
        ValueError: The profile name is unknown.
    """
    from hypothesis import HealthCheck, settings

    for profile, (max_examples, _) in PROFILES.items():
        settings.register_profile(
            profile,
            max_examples=max_examples,
            deadline=None,
            derandomize=profile not in RANDOMIZED,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
    name = name or os.environ.get(ENV_VAR) or DEFAULT_PROFILE
    if name not in PROFILES:
        raise ValueError(f"`{ENV_VAR}` ({name!r}) must be one of {sorted(PROFILES)}.")
    settings.load_profile(name)
    return name


def examples(n_ci: int) -> int:
    """Scale an example count chosen for the `ci` profile to the loaded profile.

    `dev` gives `max(2, n_ci // 5)`, `ci` gives `n_ci`, `full` and `nightly` give `5 * n_ci`; any
    other profile gives `n_ci`.

    Example:
        >>> examples(15)  # under the ci profile
        15
    """
    from hypothesis import settings

    try:
        profile = settings.get_current_profile_name()
    except Exception:  # no profile loaded yet
        profile = os.environ.get(ENV_VAR, DEFAULT_PROFILE)
    if profile == "dev":
        return max(2, n_ci // 5)
    _, scale = PROFILES.get(profile, (0, 1.0))
    return int(n_ci * scale)


def nightly_param(*values: Any, why: str, id: str | None = None) -> Any:
    """`pytest.param(*values)` that only the `full` and `nightly` profiles run (`ci` skips it).

    For parametrisations whose coverage the `ci` cases already give (a diagonal of a matrix,
    a variant of a case run elsewhere): `why` names what covers it, shown as the skip reason.
    """
    import pytest  # a test dependency, like hypothesis

    skip = pytest.mark.skipif(examples(1) < 5, reason=f"full/nightly profile ({why})")
    return pytest.param(*values, marks=skip, id=id)
