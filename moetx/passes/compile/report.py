"""What `Compile` learns on a block's first call: how many graphs ran, how many graph breaks.

Dynamo compiles lazily, so the graphs of a block are known only once it has run. Every block
of one `Compile` pass compiles through one counting backend (`CountingBackend`): a shared
backend lets blocks of one class reuse each other's graphs (no recompilation per block, so no
recompile limit), and each compiled graph is wrapped to note, while a block's first call is
being recorded, that it ran. A block's `BlockCompileStats` are filled when its first call ends
(`CompileReport` is the live object the pass's facts hold), and a block whose first call ran
no compiled graph raises the loud `EagerBlockWarning`.
"""

from __future__ import annotations

import collections
import threading
import warnings
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch._dynamo.utils import counters

__all__ = ["BlockCompileStats", "CompileReport", "CountingBackend", "EagerBlockWarning"]


class EagerBlockWarning(UserWarning):
    """A block `Compile` compiled ran its first call without any compiled graph (all eager)."""


@attrs.frozen
class BlockCompileStats:
    """One block's first call under `Compile`.

    Attributes:
        fqn: The block's module name.
        graphs: Compiled forward graphs that ran in the call (1 with no graph break).
        graph_breaks: Graph breaks dynamo reported while compiling the graphs it ran (counted
            where they were compiled: a block reusing another block's graphs gets its count).
        reasons: The distinct graph-break reasons (the first line of dynamo's wording).
    """

    fqn: str
    graphs: int
    graph_breaks: int
    reasons: tuple[str, ...] = ()


class CompileReport:
    """Per-block compile statistics of one model, filled by each block's first call."""

    def __init__(self, backend: str, blocks: tuple[str, ...]) -> None:
        self.backend, self.block_fqns = backend, blocks
        self.blocks: dict[str, BlockCompileStats] = {}

    @property
    def complete(self) -> bool:
        """Whether every block has run once (so every entry of `blocks` is known)."""
        return len(self.blocks) == len(self.block_fqns)

    def __repr__(self) -> str:
        lines = [f"Compile(backend={self.backend!r}): graphs / graph breaks per block"]
        for fqn in self.block_fqns:
            s = self.blocks.get(fqn)
            lines.append(
                f"  {fqn}: not run yet"
                if s is None
                else f"  {fqn}: {s.graphs} graphs, {s.graph_breaks} graph breaks"
                + (f" ({'; '.join(s.reasons)})" if s.reasons else "")
            )
        return "\n".join(lines)


class _Recording(threading.local):
    fqn: str | None = None
    ran: list[int]
    compiled: list[int]

    def __init__(self) -> None:
        self.ran, self.compiled = [], []


class CountingBackend:
    """A dynamo backend that compiles with `backend` and notes which graphs each block runs."""

    def __init__(self, backend: str, options: dict[str, Any]) -> None:
        self.compile_fn = torch._dynamo.lookup_backend(backend)
        self.options = options
        self.recording = _Recording()
        self.breaks_of: dict[int, tuple[int, tuple[str, ...]]] = {}  # graph id -> (breaks, why)
        self._next = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        compiled = self.compile_fn(gm, example_inputs, **self.options)
        gid, self._next = self._next, self._next + 1
        self.recording.compiled.append(gid)
        recording = self.recording

        def run(*args: Any) -> Any:
            if recording.fqn is not None:
                recording.ran.append(gid)
            return compiled(*args)

        return run

    def first_call(self, report: CompileReport, fqn: str, call: Callable[[], Any]) -> Any:
        """Run a block's first call, recording its graphs and graph breaks into `report`."""
        rec = self.recording
        outer = (rec.fqn, rec.ran, rec.compiled)
        rec.fqn, rec.ran, rec.compiled = fqn, [], []
        before = collections.Counter(counters["graph_break"])
        try:
            out = call()
        finally:
            ran, compiled = rec.ran, rec.compiled
            rec.fqn, rec.ran, rec.compiled = outer
        new = collections.Counter(counters["graph_break"]) - before
        own = (sum(new.values()), tuple(sorted({r.strip().splitlines()[0] for r in new})))
        for gid in compiled:
            self.breaks_of[gid] = own
        if compiled:
            breaks, reasons = own
        else:  # every graph came from an earlier block: its count
            breaks, reasons = self.breaks_of.get(ran[0], (0, ())) if ran else (0, ())
        report.blocks[fqn] = BlockCompileStats(fqn, len(ran), breaks, reasons)
        if not ran:
            warnings.warn(
                f"`Compile`: block `{fqn}` ran eagerly: torch.compile made no graph of its "
                f"forward ({breaks} graph breaks counted"
                + (f": {'; '.join(reasons)}" if reasons else "")
                + ").\n  fix: run with `TORCH_LOGS=graph_breaks` to see why, or pass "
                "`fullgraph=True` to raise where dynamo gives up.",
                EagerBlockWarning,
                stacklevel=2,
            )
        return out
