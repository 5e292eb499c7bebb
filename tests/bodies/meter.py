"""Rank bodies for the `LiveActivationMeter` tests: a collective whose Work outlives the forward."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from moetx.planning.meter import CollectiveHeldError, LiveActivationMeter

_LIB = torch.library.Library("c10d", "FRAGMENT")  # `LiveActivationMeter` knows c10d ops
_LIB.define("moetx_test_keep_chunks(Tensor buffer, float hold_s) -> ()")
_KEPT: list[list[torch.Tensor]] = []


def _keep_chunks(buffer: torch.Tensor, hold_s: float) -> None:
    """What gloo's all-gather Work does with its output: keep per-rank chunk views of the buffer
    it was given, and drop them later, on another thread."""
    chunks = list(buffer.chunk(2))
    _KEPT.append(chunks)
    threading.Timer(hold_s, chunks.clear).start()


_LIB.impl("moetx_test_keep_chunks", _keep_chunks, "CPU")
keep_chunks = torch.ops.c10d.moetx_test_keep_chunks


def read_while_work_held(kind: str, hold_s: float, timeout_s: float) -> dict[str, Any]:
    """Inside the meter, all-gather an op output and drop both buffers while another thread
    still holds the collective's Work for `hold_s` seconds (as gloo's worker thread does for a
    moment after `wait()`), then read the meter.

    `kind`: "c10d" (`dist.all_gather_into_tensor`, the Work held as a Python object) or
    "functional" (`_c10d_functional.all_gather_into_tensor`, the Work held by c10d's registry
    until the other thread waits on the result).

    Returns the reading (or the `CollectiveHeldError` message), the seconds the reading took,
    and the bytes of the two buffers.
    """
    world = dist.get_world_size()
    release: list[Any] = []
    with LiveActivationMeter(release_timeout=timeout_s) as meter:
        x = torch.full((4,), float(dist.get_rank())) * 2  # an op output: the collective's input
        if kind == "c10d":
            out = torch.empty(4 * world)
            work = dist.all_gather_into_tensor(out, x, async_op=True)
            assert work is not None
            work.wait()
            total = out.sum()
            release.append(work)
            del work
        else:
            name = dist.group.WORLD.group_name  # type: ignore[union-attr]
            out = torch.ops._c10d_functional.all_gather_into_tensor(x, world, name)
            total = torch.tensor(0.0)
    if kind == "functional":
        # the other thread waits on the result: until then c10d holds the Work. It waits on a
        # handle the meter never saw (made outside it, not a view), which c10d finds the Work
        # by (the storage) but which is not the program's `out`: waiting on `out` itself kept
        # it alive from the Work's release to the drop, and a reading in that moment rightly
        # counted it (an intermittent 32 bytes)
        release.append(out.detach())
    buffers = x.nbytes + out.nbytes
    del x, out

    def drop() -> None:
        if kind == "functional":
            torch.ops._c10d_functional.wait_tensor(release[0])
        release.clear()

    timer = threading.Timer(hold_s, drop)
    timer.start()
    start = time.monotonic()
    try:
        got: int | str = meter.live_bytes(exclude=[total])
    except CollectiveHeldError as e:
        got = str(e)
    took = time.monotonic() - start
    timer.join()
    return {"bytes": got, "seconds": took, "buffers": buffers}
