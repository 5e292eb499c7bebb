"""Session-wide test setup: hypothesis profiles, deterministic torch, and shared rank pools."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch

from moetx.testing import RankPool, load_profile, warm_up

# dev / ci (default) / full / nightly, chosen by $HYPOTHESIS_PROFILE; see moetx.testing.profiles.
PROFILE = load_profile()

# References are computed in this process; fail loudly on ops without a deterministic CPU kernel
# (none of the MoE ops checked: index_add, scatter_add/reduce, index_put, bincount, embedding and
# gather backward, topk, sort, SDPA) and fill `torch.empty` with NaN so uninitialised reads show.
# Ranks run with it off (see moetx.testing._worker._reset_between_calls). Costs ~0.8 s once: the
# call imports torch._inductor.config.
torch.use_deterministic_algorithms(True)

# One intra-op thread, as in the ranks: the references are tiny, and with 2 OpenMP threads on
# this 2-core box small ops such as index_add_ ran 1000x slower under contention.
torch.set_num_threads(1)

_POOLS: dict[str, RankPool] = {}

#: The shared pools' gloo timeout. A body still gets `RankPool`'s 60 s per call, but test_compile
#: raises that to 300 s for its compiling bodies on these same ranks, where a rank may compile for
#: minutes while its peer waits in a collective (a stalled collective elsewhere is still killed
#: at 60 s, as a `RankTimeoutError`).
PG_TIMEOUT_S = 300.0


def _pool(world_size: int) -> Iterator[RankPool]:
    pool = _POOLS[f"pool{world_size}"] = RankPool(world_size, pg_timeout=PG_TIMEOUT_S)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session")
def pool2() -> Iterator[RankPool]:
    """Two gloo ranks, started on first use and shared by the whole session."""
    yield from _pool(2)


@pytest.fixture(scope="session")
def pool4() -> Iterator[RankPool]:
    """Four gloo ranks, started on first use and shared by the whole session."""
    yield from _pool(4)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start the rank forkserver's imports now if any selected test uses a pool (they overlap)."""
    if any({"pool2", "pool4"} & set(getattr(item, "fixturenames", ())) for item in items):
        if importlib.util.find_spec("transformers") and any(
            item.path.name
            in ("test_hf_models.py", "test_hf_context_parallel.py", "test_autoplan_hf.py")
            for item in items
        ):  # HF tests: the ranks import transformers once, in the forkserver
            from moetx.testing import hf, ranks

            ranks.PRELOAD = (*ranks.PRELOAD, *hf.PRELOAD)
        warm_up()


def pytest_report_header() -> str:
    """Show the hypothesis profile in the header."""
    return f"moetx: hypothesis profile {PROFILE!r}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print start cost, calls and failures of each rank pool used in the session."""
    for name, pool in _POOLS.items():
        s = pool.stats
        terminalreporter.write_line(
            f"moetx {name}: first start {s.first_start_s:.2f} s, {s.starts - 1} restarts "
            f"(last {s.last_start_s:.2f} s), {s.calls} calls, {s.failures} failed"
        )
