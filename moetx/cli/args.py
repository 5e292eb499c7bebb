"""Command-line arguments shared by `moetx demo` and `moetx plan`: the `--pipeline` text."""

from __future__ import annotations

import attrs

from moetx.core.algebra import Pass, Pipeline
from moetx.passes import ActivationCheckpoint, ExpertParallel

__all__ = ["PASS_NAMES", "parse_pipeline"]

#: Names accepted by `--pipeline`, in the built-in order.
PASS_NAMES: tuple[str, ...] = ("tp", "cp", "ep", "ac", "fsdp")


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
