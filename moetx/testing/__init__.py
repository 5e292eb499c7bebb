"""Test helpers for moetx and its users: a pool of real ranks, a fake world, parity comparisons.

Also the deterministic activation-byte meter (`LiveActivationMeter`). Hypothesis strategies live
in `moetx.testing.strategies` (imported on demand, so hypothesis stays a test-only dependency).
"""

from moetx.core.errors import ProcessGroupExistsError, WorldSizeError
from moetx.planning import LiveActivationMeter, fake_world
from moetx.testing.parity import (
    ModelSnapshot,
    clean_fqn,
    compare,
    full_tensor,
    gradients,
    missing_gradients,
    parameters,
    snapshot,
)
from moetx.testing.profiles import examples, load_profile, nightly_param
from moetx.testing.ranks import (
    BackendUnavailableError,
    BodyNotPicklableError,
    PoolStats,
    RankError,
    RankPool,
    RankTimeoutError,
    cached,
    rank_device,
    warm_up,
)

__all__ = [
    "BackendUnavailableError",
    "BodyNotPicklableError",
    "LiveActivationMeter",
    "ModelSnapshot",
    "PoolStats",
    "ProcessGroupExistsError",
    "RankError",
    "RankPool",
    "RankTimeoutError",
    "WorldSizeError",
    "cached",
    "clean_fqn",
    "compare",
    "examples",
    "fake_world",
    "full_tensor",
    "gradients",
    "load_profile",
    "missing_gradients",
    "nightly_param",
    "parameters",
    "rank_device",
    "snapshot",
    "warm_up",
]
