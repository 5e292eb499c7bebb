"""`Compile`: the pass (`api`) and its per-block graph / graph-break report (`report`)."""

from moetx.passes.compile.api import BACKENDS, Compile, compile_report, is_compiled
from moetx.passes.compile.report import (
    BlockCompileStats,
    CompileReport,
    EagerBlockWarning,
)

__all__ = [
    "BACKENDS",
    "BlockCompileStats",
    "Compile",
    "CompileReport",
    "EagerBlockWarning",
    "compile_report",
    "is_compiled",
]
