"""Rank body for `benchmarks/overlap.py`: expert dispatch all-to-all, overlapped or not with the
shared expert of the same MoE layer.

One MoE layer's forward on this rank: the token copies it routes (`tokens * top_k` rows of width
H, split evenly over the ranks) leave through a functional `all_to_all_single`, as moetx's
all-to-all dispatcher sends them, while the shared-expert MLP (moetx's `DenseMLP`) runs on the
rank's own tokens. Four variants, their repetitions interleaved and each one started together on
every rank (barrier): the all-to-all alone, the shared expert alone, both in series (issue, wait,
then compute: today's order) and overlapped (issue, compute, then wait).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from moetx.models.layers import DenseMLP
from moetx.testing.ranks import rank_device

MODES = ("all_to_all", "shared", "serial", "overlap", "idle_serial", "idle_overlap")


def _wait(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, funcol.AsyncCollectiveTensor):
        return t.wait()
    return funcol.wait_tensor(t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def overlap_times(
    hidden: int,
    tokens: int,
    top_k: int,
    shared_hidden: int,
    *,
    reps: int,
    warmup: int = 3,
    idle_s: float = 0.002,
) -> dict[str, list[float]]:
    """Seconds per repetition of each of `MODES` on this rank (forward only, no autograd).

    Args:
        hidden: H.
        tokens: This rank's tokens (rows per rank x sequence length).
        top_k: Copies sent per token.
        shared_hidden: Intermediate width of the shared expert.
        reps: Timed repetitions of each mode (after `warmup`), interleaved, starting mode
            rotated each repetition.
        warmup: Untimed repetitions first.
        idle_s: The control's idle wait, in place of the shared expert.
    """
    device = rank_device()
    torch.manual_seed(dist.get_rank())
    shared = DenseMLP(hidden, shared_hidden).to(device)
    x = torch.randn(tokens, hidden, device=device)
    sent = torch.randn(tokens * top_k, hidden, device=device)
    group = dist.group.WORLD
    assert group is not None

    def a2a() -> torch.Tensor:
        return funcol.all_to_all_single(sent, None, None, group)

    def serial() -> None:
        received = _wait(a2a())
        shared(x)
        del received

    def overlapped() -> None:
        pending = a2a()
        shared(x)
        _wait(pending)

    def idle_serial() -> None:
        _wait(a2a())
        time.sleep(idle_s)

    def idle_overlapped() -> None:
        pending = a2a()
        time.sleep(idle_s)
        _wait(pending)

    run: dict[str, Callable[[], object]] = {
        "all_to_all": lambda: _wait(a2a()),
        "shared": lambda: shared(x),
        "serial": serial,
        "overlap": overlapped,
        "idle_serial": idle_serial,
        "idle_overlap": idle_overlapped,
    }
    times: dict[str, list[float]] = {m: [] for m in MODES}
    with torch.no_grad():
        for rep in range(warmup + reps):
            for i in range(len(MODES)):
                mode = MODES[(rep + i) % len(MODES)]
                _sync(device)
                dist.barrier()
                start = time.perf_counter()
                run[mode]()
                _sync(device)
                if rep >= warmup:
                    times[mode].append(time.perf_counter() - start)
    return times
