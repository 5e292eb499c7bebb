"""The parent's handle on one rank process of a `RankPool`: start it, read its replies and logs."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from moetx.testing._worker import loads, rank_main

__all__ = ["RankProcess"]


class RankProcess:
    """Parent-side handle of one rank process: its process, connection and log offsets."""

    def __init__(
        self, ctx: Any, rank: int, world_size: int, store: str, timeout: float, log_base: str
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
