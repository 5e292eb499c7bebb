"""Rank bodies for moetx's own tests of `RankPool`; module-level so the ranks can import them."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

from moetx.testing.ranks import cached


def noop() -> None:
    """Do nothing (measures the per-call overhead)."""


def rank_and_world() -> tuple[int, int, int]:
    """Return this rank, the world size and the process id."""
    return dist.get_rank(), dist.get_world_size(), os.getpid()


def all_reduce_rank() -> torch.Tensor:
    """All-reduce (sum) a tensor holding this rank's id."""
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t


def sample_tensors(rank: int) -> dict[str, Any]:
    """Build tensors of several dtypes and layouts that depend on `rank` (also used by the parent)."""
    g = torch.Generator().manual_seed(rank)
    base = torch.randn(6, 5, generator=g)
    return {
        "fp32": base,
        "bf16": base.to(torch.bfloat16),
        "int64": torch.arange(7, dtype=torch.int64) * (rank + 1),
        "bool": base > 0,
        "transposed": base.t(),
        "scalar": torch.tensor(float(rank)),
        "empty": torch.empty(0, 3),
        "nested": [base[:2], (rank, "text")],
    }


def return_tensors() -> dict[str, Any]:
    """Return `sample_tensors` for this rank."""
    return sample_tensors(dist.get_rank())


def raise_on(rank: int, message: str) -> int:
    """Raise `ValueError(message)` on `rank`; other ranks return their rank."""
    if dist.get_rank() == rank:
        raise ValueError(message)
    return dist.get_rank()


def raise_while_peers_wait(rank: int) -> None:
    """Raise on `rank` while every other rank waits in an all_reduce that never completes."""
    if dist.get_rank() == rank:
        raise ValueError(f"rank {rank} gives up before the collective")
    dist.all_reduce(torch.ones(1))


def exit_on(rank: int, code: int) -> None:
    """Kill `rank`'s process with `os._exit(code)` while the others wait in an all_reduce."""
    if dist.get_rank() == rank:
        print("about to exit", flush=True)
        os._exit(code)
    dist.all_reduce(torch.ones(1))


def sleep_on(rank: int, seconds: float) -> int:
    """Sleep on `rank` only; return the rank."""
    if dist.get_rank() == rank:
        time.sleep(seconds)
    return dist.get_rank()


def cached_object_id(key: str) -> tuple[int, int]:
    """Return the id of the object cached under `key` and the process id."""
    return id(cached(key, object)), os.getpid()


def say_hello() -> None:
    """Print to stdout and stderr."""
    import sys

    print(f"hello from rank {dist.get_rank()}")
    print(f"warning from rank {dist.get_rank()}", file=sys.stderr)


def leak_global_state() -> tuple[bool, torch.dtype]:
    """Change grad mode and the default dtype, and report what this call started with."""
    seen = (torch.is_grad_enabled(), torch.get_default_dtype())
    torch.set_grad_enabled(False)
    torch.set_default_dtype(torch.float64)
    return seen


def _linear(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def _batch(seed: int) -> torch.Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(seed + 1))


def reference_step(seed: int) -> dict[str, Any]:
    """One fwd/bwd of a tiny MLP in this process: the parity reference."""
    from moetx.testing.parity import gradients, parameters

    model = _linear(seed)
    loss = model(_batch(seed)).square().mean()
    loss.backward()
    return {"loss": loss.detach(), "grads": gradients(model), "params": parameters(model)}


def fsdp_step(seed: int) -> dict[str, Any]:
    """The same step with FSDP2 on every rank; each rank takes its slice of the batch."""
    from torch.distributed.fsdp import fully_shard

    from moetx.testing.parity import full_tensor, gradients, parameters

    model = _linear(seed)
    fully_shard(model)
    rank, ws = dist.get_rank(), dist.get_world_size()
    x = _batch(seed).chunk(ws)[rank]
    loss = model(x).square().mean()
    loss.backward()  # FSDP averages gradients over ranks: equal to the full-batch mean
    total = loss.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return {"loss": full_tensor(total), "grads": gradients(model), "params": parameters(model)}


def return_dtensor() -> Any:
    """Return a DTensor as is (bodies should call `full_tensor` first)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = cached(("selftest-1d", dist.get_world_size()), lambda: init_device_mesh("cpu", (2,)))
    return distribute_tensor(torch.arange(4.0), mesh, [Shard(0)])


class _LocalError(Exception):
    """An exception whose class is fine to pickle but carries an unpicklable attribute."""

    def __init__(self) -> None:
        super().__init__("local failure")
        self.handle = lambda: None


def raise_unpicklable() -> None:
    """Raise an exception that cannot be pickled, on every rank."""
    raise _LocalError()
