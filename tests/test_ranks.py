"""RankPool (real gloo ranks), `cached`, fake_world and profile scaling behave as documented."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moetx.testing import (
    BodyNotPicklableError,
    ProcessGroupExistsError,
    RankError,
    RankPool,
    RankTimeoutError,
    WorldSizeError,
    examples,
    fake_world,
)
from tests.bodies import selftest as bodies


@pytest.fixture(params=[2, 4], ids=["ws2", "ws4"])
def pool(request: pytest.FixtureRequest) -> RankPool:
    """The session pool of 2 or 4 ranks."""
    return request.getfixturevalue(f"pool{request.param}")  # type: ignore[no-any-return]


def test_a_second_pool_starts_once_and_runs(pool2: RankPool) -> None:
    """A second pool beside the session's starts its ranks once and runs on them (the start
    times are printed, not asserted: performance is measured, not tested)."""
    begin = time.perf_counter()
    with RankPool(2) as fresh:
        warm = time.perf_counter() - begin
        assert fresh.run(bodies.rank_and_world)[1][:2] == (1, 2)
        assert fresh.stats.starts == 1 and fresh.stats.calls == 1
    print(
        f"\npool start: first {pool2.stats.first_start_s:.2f} s (forkserver preload), warm {warm:.3f} s"
    )


def test_collective_results_come_back_per_rank_in_rank_order(pool: RankPool) -> None:
    """An all_reduce of rank ids gives every rank the sum; results are listed by rank."""
    ws = pool.world_size
    got = pool.run(bodies.all_reduce_rank)
    assert [t.item() for t in got] == [ws * (ws - 1) / 2] * ws
    assert [r[:2] for r in pool.run(bodies.rank_and_world)] == [(r, ws) for r in range(ws)]


def test_calls_reuse_the_running_ranks(pool: RankPool) -> None:
    """Calls run on the ranks already started (no restart per call: what keeps a call at a few
    milliseconds, printed here, not asserted)."""
    pool.run(bodies.noop)
    starts, calls = pool.stats.starts, pool.stats.calls
    n = 30
    begin = time.perf_counter()
    for _ in range(n):
        pool.run(bodies.noop)
    per_call = (time.perf_counter() - begin) / n
    print(f"\nper-call overhead at ws={pool.world_size}: {per_call * 1e3:.2f} ms")
    assert (pool.stats.starts, pool.stats.calls) == (starts, calls + n)


def test_tensors_come_back_intact(pool2: RankPool) -> None:
    """Dtypes, strides, scalars, empty and nested values survive the trip back."""
    for rank, got in enumerate(pool2.run(bodies.return_tensors)):
        want = bodies.sample_tensors(rank)
        assert got.keys() == want.keys()
        for key in ("fp32", "bf16", "int64", "bool", "transposed", "scalar", "empty"):
            assert got[key].dtype == want[key].dtype, key
            assert got[key].stride() == want[key].stride(), key
            assert torch.equal(got[key], want[key]), key
        assert torch.equal(got["nested"][0], want["nested"][0])
        assert got["nested"][1] == (rank, "text")


def test_a_raising_rank_is_named_with_its_traceback_and_the_pool_recovers(pool2: RankPool) -> None:
    """A body raising on rank 1 raises RankError naming rank 1; the next call runs on fresh ranks."""
    pool2.run(bodies.noop)
    before = pool2.pids
    with pytest.raises(RankError, match=r"^`raise_on` failed on rank 1 \(of 2\)\.") as err:
        pool2.run(bodies.raise_on, 1, "boom from the body")
    text = str(err.value)
    assert "--- rank 1 ---" in text
    assert "in raise_on\n    raise ValueError(message)\nValueError: boom from the body" in text
    assert set(err.value.failures) == {1}
    assert isinstance(err.value.exceptions[1], ValueError)
    assert not isinstance(err.value, RankTimeoutError)
    assert [r[:2] for r in pool2.run(bodies.rank_and_world)] == [(0, 2), (1, 2)]
    assert set(pool2.pids).isdisjoint(before)


def test_an_error_while_a_peer_waits_in_a_collective_surfaces_within_the_grace(
    pool2: RankPool,
) -> None:
    """Rank 0 raises while rank 1 blocks in all_reduce: error after the grace, rank 1 killed."""
    begin = time.perf_counter()
    with pytest.raises(RankError, match=r"failed on rank 0 \(of 2\)") as err:
        pool2.run(bodies.raise_while_peers_wait, 0)
    surfaced = time.perf_counter() - begin
    assert "rank 1: still running after the 3 s grace period; killed" in str(err.value)
    assert "ValueError: rank 0 gives up before the collective" in str(err.value)
    begin = time.perf_counter()
    assert [t.item() for t in pool2.run(bodies.all_reduce_rank)] == [1.0, 1.0]
    recovered = time.perf_counter() - begin
    print(f"\nerror surfaced after {surfaced:.2f} s; restart + next call {recovered:.2f} s")
    assert surfaced < pool2.grace + 2.0


def test_a_rank_that_dies_is_detected_without_waiting_for_the_timeout(pool2: RankPool) -> None:
    """`os._exit(3)` on rank 1 is reported as a death with its exit code, long before the timeout."""
    begin = time.perf_counter()
    with pytest.raises(RankError, match=r"failed on ranks? .*1.* \(of 2\)") as err:
        pool2.run(bodies.exit_on, 1, 3)
    detected = time.perf_counter() - begin
    print(f"\nrank death detected after {detected:.2f} s")
    assert err.value.failures[1] == "died (exit code 3)"
    assert detected < pool2.grace + 2.0
    assert len(pool2.run(bodies.noop)) == 2


def test_a_stuck_rank_times_out_and_the_pool_recovers() -> None:
    """No rank raises but rank 1 never finishes: RankTimeoutError names it, then the pool works."""
    with RankPool(2, timeout=1.0) as pool:
        begin = time.perf_counter()
        with pytest.raises(
            RankTimeoutError, match=r"^`sleep_on` did not finish on rank 1 within 1 s\."
        ):
            pool.run(bodies.sleep_on, 1, 60.0)
        assert time.perf_counter() - begin < 3.0
        assert pool.run(bodies.sleep_on, 1, 0.0) == [0, 1]
        assert pool.stats.starts == 2


def test_cached_returns_the_same_object_in_the_same_rank_process(pool2: RankPool) -> None:
    """`cached` memoizes per rank process across calls."""
    first = pool2.run(bodies.cached_object_id, "selftest-key")
    assert pool2.run(bodies.cached_object_id, "selftest-key") == first


def test_global_torch_state_is_reset_between_calls(pool2: RankPool) -> None:
    """Grad mode and default dtype changed by one body do not leak into the next."""
    pool2.run(bodies.leak_global_state)
    assert pool2.run(bodies.leak_global_state) == [(True, torch.float32)] * 2


def test_rank_output_is_copied_to_the_parent_with_a_rank_prefix(
    pool2: RankPool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Prints go to stdout and stderr with `[rank N]` prefixes, so pytest shows them on failure."""
    pool2.run(bodies.say_hello)
    out, err = capsys.readouterr()
    assert "[rank 0] hello from rank 0\n" in out
    assert "[rank 1] hello from rank 1\n" in out
    assert "[rank 1] warning from rank 1\n" in err


def test_unpicklable_bodies_are_refused_before_reaching_the_ranks(pool2: RankPool) -> None:
    """A lambda cannot be pickled by reference: refused with the fix, the pool is untouched."""
    pool2.run(bodies.noop)
    pids = pool2.pids
    with pytest.raises(BodyNotPicklableError, match=r"^`\S*<lambda>` cannot be sent to the ranks"):
        pool2.run(lambda: 1)
    assert pool2.pids == pids


def test_returned_dtensors_are_refused_with_the_fix(pool2: RankPool) -> None:
    """A DTensor result would arrive as one shard; the rank refuses it and names the fix."""
    with pytest.raises(RankError, match=r"fix: return `moetx.testing.full_tensor\(t\)`"):
        pool2.run(bodies.return_dtensor)


def test_world_size_must_be_positive() -> None:
    """Pools and fake worlds need at least one rank, and a rank inside the world."""
    with pytest.raises(WorldSizeError, match=r"^`world_size` \(0\) must be at least 1\.$"):
        RankPool(0)
    with (
        pytest.raises(WorldSizeError, match=r"^`rank` \(4\) must be in \[0, 4\)\.$"),
        fake_world(4, rank=4),
    ):
        pass


def test_fake_world_builds_a_large_mesh_fast_and_cleans_up() -> None:
    """A (64, 4) mesh over 256 fake ranks takes milliseconds; no group survives the block."""
    begin = time.perf_counter()
    with fake_world(256, rank=7):
        mesh = init_device_mesh("cpu", (64, 4), mesh_dim_names=("a", "b"))
        assert (mesh["a"].size(), mesh["b"].size()) == (64, 4)
        assert (mesh.get_local_rank("a"), mesh.get_local_rank("b")) == (1, 3)
    elapsed = time.perf_counter() - begin
    print(f"\nfake world 256, (64, 4) mesh: {elapsed * 1e3:.1f} ms")
    assert elapsed < 2.0
    assert not dist.is_initialized()
    assert not dist.distributed_c10d._world.pg_map


def test_fake_world_cleans_up_after_an_error_and_refuses_nesting() -> None:
    """The group is destroyed even when the block raises; a second world inside is refused."""
    with pytest.raises(KeyError), fake_world(8):
        init_device_mesh("cpu", (4, 2))
        raise KeyError("inside")
    assert not dist.is_initialized()
    with (
        fake_world(2),
        pytest.raises(ProcessGroupExistsError, match=r"already initialised"),
        fake_world(2),
    ):
        pass
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("profile", "want"), [("dev", [2, 3]), ("ci", [10, 15]), ("full", [50, 75])]
)
def test_examples_scale_with_the_profile(profile: str, want: list[int]) -> None:
    """`examples(n)` gives max(2, n // 5) under dev, n under ci and 5n under full."""
    from hypothesis import settings

    current = settings.get_current_profile_name()
    settings.load_profile(profile)
    try:
        assert [examples(10), examples(15)] == want
    finally:
        settings.load_profile(current)


def test_an_unpicklable_exception_still_reports_its_traceback(pool2: RankPool) -> None:
    """The traceback text arrives even when the exception object cannot travel."""
    with pytest.raises(RankError, match=r"failed on ranks 0, 1 \(of 2\)") as err:
        pool2.run(bodies.raise_unpicklable)
    assert "_LocalError: local failure" in str(err.value)
    assert err.value.exceptions == {}


def test_a_rank_killed_while_idle_is_reported_on_the_next_call(pool2: RankPool) -> None:
    """A rank that died between calls (OOM killer, signal) fails the next call, not the one after."""
    import os
    import signal

    pool2.run(bodies.noop)  # (re)start the ranks if an earlier test left them stopped
    os.kill(pool2.pids[1], signal.SIGKILL)
    with pytest.raises(RankError, match=r"failed on rank 1 \(of 2\)") as err:
        pool2.run(bodies.noop)
    assert err.value.failures == {1: "died (exit code -9)"}
    assert pool2.run(bodies.noop) == [None, None]
