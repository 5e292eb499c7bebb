"""Command-line arguments shared by `moetx demo` and `moetx plan`: `--pipeline`, ranges."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import attrs

from moetx.core.algebra import Pass, Pipeline, registered_passes
from moetx.core.errors import CommandLineError
from moetx.core.order import BUILTIN_ORDER
from moetx.passes import ActivationCheckpoint, ExpertParallel

__all__ = ["PASS_NAMES", "check_ranges", "parse_pipeline"]

#: Names accepted by `--pipeline`: the registered built-in passes, in the built-in order.
PASS_NAMES: tuple[str, ...] = tuple(s for s in BUILTIN_ORDER if s in registered_passes())


def parse_pipeline(
    text: str, *, dispatcher: str = "all_to_all", ac_mode: str = "router"
) -> Pipeline:
    """Turn `"ep|ac|fsdp"` into a Pipeline, raising moetx's own errors for bad text or order.

    `dispatcher` and `ac_mode` configure `ExpertParallel` and `ActivationCheckpoint` when the
    text names them without options (`Pipeline.parse` accepts `ep(dispatcher=...)` too).
    """
    names = [n.strip().partition("(")[0].strip() for n in text.split("|") if n.strip()]
    unknown = [n for n in names if n not in PASS_NAMES]
    if unknown:
        raise ValueError(
            f"`--pipeline` names an unknown pass ({unknown[0]!r}); use names from "
            f"{PASS_NAMES} joined by '|', e.g. 'ep|ac|fsdp'."
        )
    defaults: dict[type[Pass], dict[str, str]] = {
        ExpertParallel: {"dispatcher": dispatcher},
        ActivationCheckpoint: {"mode": ac_mode},
    }
    passes = [
        attrs.evolve(p, **defaults[type(p)])  # type: ignore[misc]
        if type(p) in defaults and p == type(p)()
        else p
        for p in Pipeline.parse(text)
    ]
    return Pipeline(tuple(passes))


def check_ranges(
    prog: str,
    args: argparse.Namespace,
    minimums: Mapping[str, int],
    *,
    below: Mapping[str, tuple[int, str]] | None = None,
) -> None:
    """Raise one `CommandLineError` naming every out-of-range argument of `prog`.

    Args:
        prog: The command (`"moetx demo"`), for the fix line.
        args: Parsed arguments; `None` values (an unset optional flag) are skipped.
        minimums: Destination name -> the least value it may take.
        below: Destination name -> (an exclusive upper bound, what the bound is).
    """
    problems = []
    for dest, least in minimums.items():
        value = getattr(args, dest)
        if value is not None and value < least:
            problems.append(f"`{_flag(dest)}` ({value}) must be an integer >= {least}.")
    for dest, (bound, what) in (below or {}).items():
        value = getattr(args, dest)
        if value is not None and value >= bound:
            problems.append(f"`{_flag(dest)}` ({value}) must be less than {what} ({bound}).")
    if problems:
        raise CommandLineError(
            "\n".join(problems) + f"\n  fix: change these flags (`{prog} --help` lists them)."
        )


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")
