"""The parent's handle on one rank process of a `RankPool`: start it, read replies and logs, report."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from moetx.core.errors import MoetxError
from moetx.testing._worker import loads, rank_main

__all__ = ["RankError", "RankProcess", "RankTimeoutError", "rank_error"]


class RankError(MoetxError, RuntimeError):
    """A rank body raised, or a rank process died; every rank has been killed and will restart.

    Attributes:
        failures: Rank -> formatted traceback or description, for every rank that did not return.
        exceptions: Rank -> the exception the body raised, where it could be sent back.
    """

    def __init__(
        self,
        message: str,
        failures: dict[int, str],
        exceptions: dict[int, BaseException] | None = None,
    ) -> None:
        super().__init__(message)
        self.failures = failures
        self.exceptions = exceptions or {}


class RankTimeoutError(RankError):
    """No rank raised, but some did not finish within the pool's timeout (deadlock or slow body)."""


class RankProcess:
    """Parent-side handle of one rank process: its process, connection and log offsets."""

    def __init__(
        self,
        ctx: Any,
        rank: int,
        world_size: int,
        store: str,
        timeout: float,
        log_base: str,
        backend: str = "gloo",
    ) -> None:
        self.rank = rank
        self.logs = (log_base + ".out", log_base + ".err")
        self.offsets = [0, 0]
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=rank_main,
            args=(
                rank,
                world_size,
                store,
                timeout,
                child,
                self.logs,
                backend,
            ),
            name=f"moetx-rank{rank}",
            daemon=True,
        )
        self.process.start()
        child.close()

    def echo(self) -> str:
        """Copy new log output to the parent's stdout/stderr; return the new stderr text."""
        err = ""
        for i, stream in enumerate((sys.stdout, sys.stderr)):
            try:
                with open(self.logs[i], "rb") as f:
                    f.seek(self.offsets[i])
                    data = f.read()
            except FileNotFoundError:
                continue
            self.offsets[i] += len(data)
            text = data.decode("utf-8", "replace")
            if text:
                stream.write(
                    "".join(f"[rank {self.rank}] {line}" for line in text.splitlines(True))
                )
                stream.write("" if text.endswith("\n") else "\n")
                stream.flush()
            err = text if i == 1 else err
        return err

    def receive(self) -> tuple[bool, Any, BaseException | None] | None:
        """Read the rank's reply `(ok, result or traceback, exception)`; None if it died."""
        try:
            if not self.conn.poll():
                return None
            data = self.conn.recv_bytes()
        except (EOFError, OSError):
            return None
        try:
            ok, value, exc_bytes = loads(data)
        except Exception as err:  # e.g. a result whose class the parent cannot import
            return False, f"the parent could not unpickle the reply: {err!r}", err
        raised = None
        if exc_bytes is not None:
            with contextlib.suppress(Exception):  # the traceback text is enough
                raised = loads(exc_bytes)
        return ok, value, raised

    def death(self) -> str:
        """Describe a rank that died: its exit code and the end of its stderr."""
        self.process.join(1)
        text = f"died (exit code {self.process.exitcode})"
        err = self.echo().rstrip()
        if err:
            text += "; last stderr lines:\n" + "\n".join(err.splitlines()[-20:])
        return text

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


def rank_error(
    what: str,
    world_size: int,
    failures: dict[int, str],
    exceptions: dict[int, BaseException],
    stuck: list[int],
    timeout: float,
    grace: float,
) -> RankError:
    """Build the error for a failed call: which ranks failed, how, and their tracebacks."""
    lines = []
    if failures:
        names = ", ".join(map(str, sorted(failures)))
        plural = "s" if len(failures) > 1 else ""
        lines.append(f"{what} failed on rank{plural} {names} (of {world_size}).")
    else:
        names = ", ".join(map(str, stuck))
        plural = "s" if len(stuck) > 1 else ""
        lines.append(f"{what} did not finish on rank{plural} {names} within {timeout:g} s.")
    for rank in stuck:
        after = f"the {grace:g} s grace period" if failures else f"{timeout:g} s"
        lines.append(f"  rank {rank}: still running after {after}; killed")
    lines.append("  every rank was killed; the next `run` starts fresh ranks")
    for rank, text in sorted(failures.items()):
        lines.append(f"--- rank {rank} ---")
        lines.append(text.rstrip())
    cls = RankError if failures else RankTimeoutError
    return cls("\n".join(lines), failures | dict.fromkeys(stuck, "killed"), exceptions)
