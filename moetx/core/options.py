"""Pass options: each field declares a `Rule`, and a pass checks all of them at once when built.

A pass class declares its fields with `option(default, rule)`; `Pass.__attrs_post_init__` calls
`check_options`, so construction, `attrs.evolve` and `Pipeline.parse` all validate the same way
and report every bad field in one `PassOptionError` (never attrs' tuple-repr messages).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from moetx.core.errors import PassOptionError

__all__ = [
    "Rule",
    "at_least",
    "axis_name",
    "check_options",
    "flag",
    "one_of",
    "option",
    "unknown_options",
]

_RULE_KEY = "moetx_rule"


@attrs.frozen
class Rule:
    """What an option accepts.

    Attributes:
        allowed: The constraint as a phrase that follows "must be" ("one of 'a', 'b'").
        accepts: Whether a value is allowed.
        hint: Optional extra sentence for a rejected value (None: no hint).
    """

    allowed: str
    accepts: Callable[[Any], bool]
    hint: Callable[[Any], str | None] | None = None


def _same(value: Any, allowed: Any) -> bool:
    # Type-strict: `1 == True` and `1.0 == 1` in Python, but not as options.
    return type(value) is type(allowed) and bool(value == allowed)


def one_of(*values: Any) -> Rule:
    """Exactly one of `values` (compared with their type: the int 1 is not True)."""
    return Rule(
        "one of " + ", ".join(repr(v) for v in values),
        lambda v: any(_same(v, a) for a in values),
    )


def flag() -> Rule:
    """A bool."""
    return Rule("True or False", lambda v: isinstance(v, bool))


def at_least(least: int) -> Rule:
    """An int (not a bool) >= `least`."""
    return Rule(
        f"an int >= {least}",
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least,
    )


def axis_name() -> Rule:
    """A non-empty str."""
    return Rule("a non-empty str", lambda v: isinstance(v, str) and bool(v))


def option(default: Any, rule: Rule, *, converter: Callable[[Any], Any] | None = None) -> Any:
    """An attrs field checked by `rule` when the pass is built (see `check_options`)."""
    return attrs.field(default=default, converter=converter, metadata={_RULE_KEY: rule})


def check_options(value: Any) -> None:
    """Raise one `PassOptionError` naming every field of `value` its `Rule` rejects."""
    cls = type(value)
    problems: list[str] = []
    bad: list[str] = []
    for f in attrs.fields(cls):
        rule: Rule | None = f.metadata.get(_RULE_KEY)
        v = getattr(value, f.name)
        if rule is None or rule.accepts(v):
            continue
        hint = rule.hint(v) if rule.hint is not None else None
        line = f"`{cls.__name__}.{f.name}` ({v!r}) must be {rule.allowed}."
        problems.append(line + (f" {hint}" if hint else ""))
        default = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default  # type: ignore[arg-type]
        bad.append(f"{f.name}={default!r}")
    if problems:
        raise PassOptionError(
            "\n".join(problems)
            + f"\n  fix: use allowed values, e.g. the defaults: `{cls.__name__}({', '.join(bad)})`.",
            tuple(problems),
        )


def unknown_options(cls: type, names: list[str]) -> None:
    """Raise `PassOptionError` if `names` holds an option `cls` (an attrs class) lacks."""
    if not attrs.has(cls):
        return
    known = [f.name for f in attrs.fields(cls)]
    unknown = [n for n in names if n not in known]
    if unknown:
        listed = ", ".join(f"`{n}`" for n in known)
        raise PassOptionError(
            f"`{cls.__name__}` has no option `{unknown[0]}`; its options: {listed}.\n"
            f"  fix: use only these options (see `help(moetx.{cls.__name__})`)."
        )
