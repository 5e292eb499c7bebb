"""A persistent pool of real gloo ranks (forkserver processes), so multi-rank tests cost milliseconds.

Starting ranks costs 1-7 s with spawn or torchrun but about 0.1 s with a forkserver that has torch
preloaded (TORCH-CPU-NOTES §2). `RankPool` starts its ranks once, creates the gloo process group
once, and then runs module-level functions ("rank bodies") on every rank, a few ms per call:

    with RankPool(2) as pool:
        sums = pool.run(all_reduce_rank)  # one return value per rank, in rank order

Rules for bodies:
    - A body is a module-level function in an importable module (it is pickled by reference),
      called as `fn(*args, **kwargs)` on every rank; it finds its rank with `dist.get_rank()`.
    - It returns plain picklable values and tensors (convert DTensors with `full_tensor`): results
      travel back through `torch.save`, because tensors sent through mp queues die with the
      child (notes §4.6).
    - It asserts nothing: a failing assertion on one rank leaves its peers stuck in a collective.
      Bodies return results and the parent compares them.
    - It seeds itself, and caches meshes with `cached` (every `init_device_mesh` call creates new
      gloo groups, which leak fds and threads in a long-lived rank, notes §4.9).

When a rank raises or dies, the pool collects the others for `grace` seconds, kills every rank and
raises `RankError`; when no rank finishes within `timeout`, it kills them and raises
`RankTimeoutError`. Either way the next `run` starts fresh ranks (and an empty `cached`).

Between calls each rank resets the torch globals a body may have changed (grad mode, default dtype,
...; see `moetx.testing._worker._reset_between_calls`).

`RankPool(n, backend="nccl")` starts NCCL ranks instead, rank r on GPU `cuda:r` (it refuses a
machine with fewer GPUs than ranks, `BackendUnavailableError`). A body written against
`rank_device()` (move the model and the batch there; results come back as CPU copies through
`full_tensor`) runs unchanged on both, so its gloo run proves everything but the device plumbing.

Rank output (prints, warnings, faulthandler dumps) goes to per-rank log files that the parent copies
to its own stdout/stderr after each call, each line prefixed with `[rank N]`; under pytest it is
captured per test and shown only when the test fails.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Hashable
from multiprocessing.connection import wait
from typing import Any, TypeVar

import attrs
import torch
import torch.distributed as dist

from moetx.core.errors import MoetxError, WorldSizeError
from moetx.testing._rank_process import RankError, RankProcess, RankTimeoutError, rank_error
from moetx.testing._worker import BACKENDS, STOP, dumps, rank_device

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "BodyNotPicklableError",
    "PoolStats",
    "RankError",
    "RankPool",
    "RankTimeoutError",
    "WorldSizeError",
    "cached",
    "rank_device",
    "warm_up",
]

T = TypeVar("T")

# Imported once by the forkserver and inherited by every rank it forks. The list is global to the
# forkserver (one per parent process), so every pool in a session shares it; it only takes effect
# if it is set before the forkserver starts, i.e. before the first pool in this process. Extend it
# when fresh ranks are seen importing something slow on their first call: torch._dynamo (0.9 s),
# which the first `distribute_tensor` or `fully_shard` imports, would otherwise be paid by every
# rank after every restart.
PRELOAD = (
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "torch.distributed.checkpoint",
    "moetx",
    "moetx.testing.ranks",
)


class BodyNotPicklableError(MoetxError, TypeError):
    """A rank body or its arguments cannot be pickled, so it cannot be sent to the ranks."""


class BackendUnavailableError(MoetxError, RuntimeError):
    """The pool's backend cannot run here (NCCL without one CUDA device per rank)."""


def _check_backend(backend: str, world_size: int) -> None:
    """Refuse an unknown backend, or NCCL without NCCL or one CUDA device per rank."""
    if backend not in BACKENDS:
        raise ValueError(
            f"`backend` ({backend!r}) must be one of {', '.join(map(repr, BACKENDS))}."
        )
    if backend != "nccl":
        return
    gpus = torch.cuda.device_count()
    if gpus < world_size or not dist.is_nccl_available():
        build = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"
        nccl = "" if dist.is_nccl_available() else ", without NCCL"
        raise BackendUnavailableError(
            f"`RankPool({world_size}, backend='nccl')` needs one CUDA device per rank "
            f"({world_size}), but this machine has {gpus} ({build}{nccl}).\n"
            "  fix: run on a machine with that many GPUs, or use backend='gloo' (CPU)."
        )


@attrs.define
class PoolStats:
    """Counters and timings of one pool, for reports.

    Attributes:
        starts: How many times the ranks were started (1 + restarts).
        first_start_s: Seconds the first start took (includes the forkserver's preload imports).
        last_start_s: Seconds the latest start took.
        calls: Completed `run` calls.
        failures: `run` calls that raised `RankError` (timeouts included).
    """

    starts: int = 0
    first_start_s: float = 0.0
    last_start_s: float = 0.0
    calls: int = 0
    failures: int = 0


_CACHE: dict[Hashable, Any] = {}


def cached(key: Hashable, factory: Callable[[], T]) -> T:
    """Return the object cached under `key` in this process, building it with `factory` once.

    Use it in rank bodies for objects that must be built once per rank process, such as device
    meshes (each `init_device_mesh` creates new gloo groups). Every rank must call it with the same
    keys in the same order when `factory` runs collectives. The cache empties when the pool
    restarts its ranks.

    Args:
        key: Any hashable; include everything the object depends on (shape, axis names, ...).
        factory: Builds the object on the first call.

    Returns:
        The cached object.
    """
    try:
        return _CACHE[key]  # type: ignore[no-any-return]
    except KeyError:
        value = _CACHE[key] = factory()
        return value


# ---------------------------------------------------------------------------- in the parent


def _context() -> Any:
    """The forkserver context, with the preload list set (global to the forkserver)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    # NCCL ranks use CUDA, which a fork after CUDA's initialisation breaks: should a preloaded
    # import ask `torch.cuda.is_available()`, the forkserver (which inherits this environment
    # when it starts) answers through NVML and leaves CUDA uninitialised.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return ctx


def warm_up() -> None:
    """Start the forkserver now, so its preload imports (seconds) overlap with other work.

    The first `RankPool` then finds the server ready. Safe to call more than once.
    """
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


class RankPool:
    """N real ranks (gloo, or NCCL with one GPU each, over a FileStore), started once, reused.

    Args:
        world_size: Number of ranks.
        timeout: Seconds a `run` may take before the ranks are killed; also the gloo timeout
            unless `pg_timeout` is given.
        grace: Seconds to wait for the other ranks once one has raised or died.
        pg_timeout: The gloo timeout (`init_process_group(timeout=...)`) when it should differ
            from `timeout`, e.g. shorter, to see a stalled collective fail inside a body.
        backend: `"gloo"` (CPU) or `"nccl"`: rank r computes on `cuda:r` (bodies find their
            device with `rank_device()`).

    Raises:
        WorldSizeError: `world_size` is below 1.
        ValueError: `backend` is not one of `BACKENDS`.
        BackendUnavailableError: NCCL, but no NCCL or fewer CUDA devices than ranks.
        RankError: A rank failed to start.

    Example:
        >>> with RankPool(2) as pool:  # doctest: +SKIP
        ...     pool.run(all_reduce_rank)
    """

    def __init__(
        self,
        world_size: int,
        *,
        timeout: float = 60.0,
        grace: float = 3.0,
        pg_timeout: float | None = None,
        backend: str = "gloo",
    ) -> None:
        if world_size < 1:
            raise WorldSizeError(f"`world_size` ({world_size}) must be at least 1.")
        _check_backend(backend, world_size)
        self.backend = backend
        self.world_size = world_size
        self.timeout = timeout
        self.pg_timeout = timeout if pg_timeout is None else pg_timeout
        self.grace = grace
        self.stats = PoolStats()
        self._tmpdir = tempfile.mkdtemp(prefix=f"moetx-ranks{world_size}-")
        self._ranks: list[RankProcess] = []
        self._closed = False
        # Remove logs and stores even if `close` is never called (ranks are daemons: they die
        # with this process).
        weakref.finalize(self, shutil.rmtree, self._tmpdir, ignore_errors=True)
        self._start()

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._ranks else "stopped"
        backend = "" if self.backend == "gloo" else f", backend={self.backend!r}"
        return (
            f"RankPool(world_size={self.world_size}{backend}, {state}, starts={self.stats.starts})"
        )

    @property
    def pids(self) -> list[int]:
        """Process ids of the current ranks, in rank order (empty while stopped)."""
        return [r.process.pid or 0 for r in self._ranks]

    def _start(self) -> None:
        begin = time.perf_counter()
        ctx = _context()
        self.stats.starts += 1
        store = os.path.join(self._tmpdir, f"store-gen{self.stats.starts}")
        gen = self.stats.starts
        self._ranks = [
            RankProcess(
                ctx, r, self.world_size, store, self.pg_timeout,
                os.path.join(self._tmpdir, f"rank{r}-gen{gen}"), self.backend,
            )
            for r in range(self.world_size)
        ]  # fmt: skip
        self._collect(what="starting the ranks", timeout=max(self.timeout, 120.0))
        elapsed = time.perf_counter() - begin
        self.stats.first_start_s = self.stats.first_start_s or elapsed
        self.stats.last_start_s = elapsed

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `fn(*args, **kwargs)` on every rank and return the results in rank order.

        Args:
            fn: A module-level function in a module the ranks can import.
            *args: Positional arguments, pickled with `torch.save`.
            **kwargs: Keyword arguments, pickled with `torch.save`.

        Returns:
            One return value per rank.

        Raises:
            BodyNotPicklableError: `fn` or its arguments cannot be pickled.
            RankError: A rank raised or died; the message names the ranks and holds the tracebacks.
            RankTimeoutError: Some rank did not finish within `timeout`.
        """
        if self._closed:
            raise RuntimeError("this RankPool is closed")
        try:
            message = dumps((fn, args, kwargs))
        except Exception as exc:
            name = getattr(fn, "__qualname__", repr(fn))
            raise BodyNotPicklableError(
                f"`{name}` cannot be sent to the ranks ({type(exc).__name__}: {exc}).\n"
                "  fix: define rank bodies as module-level functions in an importable module, "
                "and pass only picklable arguments."
            ) from exc
        if not self._ranks:
            self._start()
        for r in self._ranks:
            with contextlib.suppress(OSError):  # a rank that died while idle is reported below
                r.conn.send_bytes(message)
        name = getattr(fn, "__qualname__", repr(fn))
        try:
            results = self._collect(what=f"`{name}`", timeout=self.timeout)
        except RankError:
            raise
        except BaseException:  # e.g. Ctrl-C: ranks may still be busy, so replies would misalign
            self._kill()
            raise
        self.stats.calls += 1
        return results

    def _collect(self, *, what: str, timeout: float) -> list[Any]:
        """Wait for one reply per rank; on any failure kill every rank and raise."""
        ranks = self._ranks
        by_wait_obj: dict[Any, RankProcess] = {}
        for r in ranks:
            by_wait_obj[r.conn] = r
            by_wait_obj[r.process.sentinel] = r
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        exceptions: dict[int, BaseException] = {}
        deadline = time.monotonic() + timeout
        while len(results) + len(failures) < len(ranks):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            pending = [r for r in ranks if r.rank not in results and r.rank not in failures]
            ready = wait([o for r in pending for o in (r.conn, r.process.sentinel)], remaining)
            for rank in {by_wait_obj[o] for o in ready}:
                if rank.rank in results or rank.rank in failures:
                    continue
                reply = rank.receive()
                if reply is None:  # the process is gone without replying
                    failures[rank.rank] = rank.death()
                elif reply[0]:
                    results[rank.rank] = reply[1]
                else:
                    failures[rank.rank] = reply[1]
                    if reply[2] is not None:
                        exceptions[rank.rank] = reply[2]
            if failures:
                deadline = min(deadline, time.monotonic() + self.grace)
        for r in ranks:
            r.echo()
        if len(results) == len(ranks):
            return [results[i] for i in range(len(ranks))]
        self.stats.failures += 1
        self._kill()
        stuck = [r.rank for r in ranks if r.rank not in results and r.rank not in failures]
        raise rank_error(what, len(ranks), failures, exceptions, stuck, timeout, self.grace)

    def _kill(self) -> None:
        for r in self._ranks:
            r.kill()
        self._ranks = []

    def close(self) -> None:
        """Stop the ranks (cleanly if they are idle) and remove the pool's files."""
        if self._closed:
            return
        self._closed = True
        for r in self._ranks:
            with contextlib.suppress(OSError):
                r.conn.send_bytes(STOP)
        deadline = time.monotonic() + 5.0
        for r in self._ranks:
            r.process.join(max(0.0, deadline - time.monotonic()))
            r.echo()
        self._kill()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
