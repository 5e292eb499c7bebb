"""The rules `FSDP`'s options are checked against, each with the hint its error message gives."""

from __future__ import annotations

from typing import Any

from moetx.core.options import Rule, one_of
from moetx.passes.fsdp.reshard import AUTO

__all__ = ["DTYPE", "DTYPES", "FP32_ROLES", "RESHARD", "ROLES", "roles"]

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
#: Module roles that may be kept in fp32 under a low-precision `param_dtype`.
FP32_ROLES: tuple[str, ...] = ("router", "lm_head")

#: `param_dtype`, `reduce_dtype`, `output_dtype`: a dtype name, or None.
DTYPE = one_of(None, *DTYPES)


def roles(value: Any) -> Any:
    """`fp32_modules`' converter: a single role may be given as a str, the roles as a list;
    anything else is left for `ROLES` to refuse."""
    return (
        (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else value
    )


ROLES = Rule(
    f"a tuple of roles from {FP32_ROLES}",
    lambda v: isinstance(v, tuple) and all(isinstance(r, str) and r in FP32_ROLES for r in v),
)


def _reshard_hint(value: object) -> str | None:
    if isinstance(value, str) and value.lower() == AUTO and value != AUTO:
        return f"Write {AUTO!r} in lower case."
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return (
            f"The int {value} is no group size: FSDP2 would take 1 as False (keep parameters "
            "gathered) although `1 == True` in Python, so write True or False."
        )
    return None


RESHARD = Rule(
    "True, False or an int >= 2 (the size of the group to reshard to after forward), or "
    f"{AUTO!r} (keep units gathered while they fit the rank's sharded training state)",
    lambda v: v == AUTO or isinstance(v, bool) or (isinstance(v, int) and v >= 2),
    _reshard_hint,
)
