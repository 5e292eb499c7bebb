"""The rank side of `RankPool`: init the process group once, then run bodies, reply in bytes.

Each rank process runs `rank_main`. It redirects its stdout/stderr to log files (the parent echoes
them), starts gloo (or NCCL on its own CUDA device: `cuda:<rank>`), then serves `(fn, args, kwargs)` messages until it reads `STOP` or its pipe
closes. Every reply is `(ok, result or formatted traceback, pickled exception or None)`, serialized with
`torch.save` because tensors sent through mp queues die with the child (TORCH-CPU-NOTES §4.6).
"""

from __future__ import annotations

import faulthandler
import io
import os
import sys
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

STOP = b""  # sent to a rank to make it leave its loop and exit cleanly
BACKENDS = ("gloo", "nccl")
"""Process-group backends a `RankPool` can start: gloo on the CPU, NCCL with one GPU per rank."""
_CP_OPTIONS_DEFAULTS: dict[str, Any] = {}


def _snapshot_global_state() -> None:
    """Record the defaults that `_reset_between_calls` restores."""
    try:
        from torch.distributed.tensor.experimental._context_parallel import _attention
    except ImportError:  # private module; its state is simply not reset if it moves
        return
    _CP_OPTIONS_DEFAULTS.update(vars(_attention._cp_options))


def _reset_between_calls() -> None:
    """Undo module-global torch state a body may have changed, so calls stay independent.

    Resets grad mode, anomaly mode, default dtype and device, intra-op threads, the
    deterministic-algorithms flag (ranks run with it off: turning it on or off imports
    `torch._inductor.config`, 0.8-2 s per rank) and context-parallel options (`_cp_options`: load
    balance, rotate method). Seeding is each body's job. Extend this list when a pass starts
    writing another global.
    """
    torch.set_grad_enabled(True)
    torch.autograd.set_detect_anomaly(False)
    torch.set_default_dtype(torch.float32)
    if torch.get_default_device().type != "cpu":
        torch.set_default_device(None)
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    if torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(False)
    if _CP_OPTIONS_DEFAULTS:
        from torch.distributed.tensor.experimental._context_parallel import _attention

        vars(_attention._cp_options).update(_CP_OPTIONS_DEFAULTS)
    sys.stdout.flush()
    sys.stderr.flush()


def _reject_dtensors(result: object) -> None:
    """Refuse DTensors in a result: in the parent they would be one rank's shard, not the tensor."""
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_leaves

    if any(isinstance(leaf, DTensor) for leaf in tree_leaves(result)):
        raise TypeError(
            "The body returned a DTensor, which would arrive as this rank's shard only.\n"
            "  fix: return `moetx.testing.full_tensor(t)` (all ranks) or `t.to_local()`."
        )


def rank_device() -> torch.device:
    """The device this rank computes on: `cuda:<its GPU>` under NCCL, else the CPU.

    Rank bodies move their model and batch here, so one body serves gloo and NCCL pools alike.
    """
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dumps(obj: object) -> bytes:
    """Serialize `obj` with `torch.save` (functions by reference, tensors by value)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loads(data: bytes) -> Any:
    """Inverse of `dumps`; trusted input only (`weights_only=False` unpickles anything)."""
    return torch.load(io.BytesIO(data), weights_only=False)


def _failure(exc: BaseException, prefix: str = "") -> bytes:
    """Serialize a failure reply: the formatted traceback, and the exception if it pickles.

    The exception travels as nested bytes, so the parent can still read the traceback when it
    cannot unpickle the exception itself.
    """
    text = prefix + "".join(traceback.format_exception(exc))
    try:
        exc_bytes: bytes | None = dumps(exc)
    except Exception:
        exc_bytes = None
    return dumps((False, text, exc_bytes))


def rank_main(
    rank: int,
    world_size: int,
    store_path: str,
    timeout_s: float,
    conn: Connection,
    logs: tuple[str, str],
    backend: str = "gloo",
) -> None:
    """Entry point of a rank process: init the group once, then serve calls until told to stop.

    Under NCCL, rank r binds `cuda:r` (`device_id`: the communicator starts eagerly, so a broken
    GPU setup fails here, at start, rather than in the first body's first collective).
    """
    for fd, path in zip((1, 2), logs, strict=True):
        log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, fd)
        os.close(log)
    faulthandler.enable()
    torch.set_num_threads(1)  # one intra-op thread per rank: 2 cores, and fork-safe OpenMP (§4.7)
    try:
        device = None
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend,
            store=dist.FileStore(store_path, world_size),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device,
        )
        _snapshot_global_state()
        _reset_between_calls()
    except BaseException as exc:
        conn.send_bytes(_failure(exc, "while starting the rank:\n"))
        return
    conn.send_bytes(dumps((True, None, None)))
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # the parent went away
            break
        if message == STOP:
            break
        try:
            fn, args, kwargs = loads(message)
            result = fn(*args, **kwargs)
            if not dist.is_initialized():
                raise RuntimeError("The body destroyed the default process group.")
            _reject_dtensors(result)
            reply = dumps((True, result, None))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a body must not end the rank
            reply = _failure(exc)
        finally:
            _reset_between_calls()
        conn.send_bytes(reply)
    if dist.is_initialized():
        dist.destroy_process_group()
