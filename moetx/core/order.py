"""Ordering rules between passes, held as data so user-defined passes can declare their place.

A pass class declares a `Placement`: its *stage* name and the stages it must come after or
before when they are present. The built-in chain `tp -> cp -> ep -> ac -> compile -> fsdp` is one such
set of rules (`BUILTIN_ORDER`). Constraints are closed transitively over every stage known to
a pipeline, so a `prefetch` stage declared "after ac, before fsdp" also sits after `ep`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import attrs

#: The built-in order: tensor, context and expert parallel, activation checkpointing,
#: compilation (per block, so FSDP's hooks stay outside), FSDP.
BUILTIN_ORDER: tuple[str, ...] = ("tp", "cp", "ep", "ac", "compile", "fsdp")


def _frozen_strs(value: Iterable[str]) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset((value,))
    return frozenset(value)


@attrs.frozen
class Placement:
    """Where a kind of pass sits in a pipeline.

    Args:
        stage: Unique name of the stage (e.g. ``"ep"``); a pipeline holds each stage at most once.
        after: Stages that must come earlier in a pipeline when both are present.
        before: Stages that must come later in a pipeline when both are present.

    Example:
        >>> Placement("prefetch", after={"ac"}, before={"fsdp"})
        Placement(stage='prefetch', after=frozenset({'ac'}), before=frozenset({'fsdp'}))
    """

    stage: str = attrs.field(
        validator=attrs.validators.and_(
            attrs.validators.instance_of(str), attrs.validators.min_len(1)
        )
    )
    after: frozenset[str] = attrs.field(default=frozenset(), converter=_frozen_strs)
    before: frozenset[str] = attrs.field(default=frozenset(), converter=_frozen_strs)

    @classmethod
    def builtin(cls, stage: str) -> Placement:
        """The placement of one of the built-in stages, read off `BUILTIN_ORDER`."""
        i = BUILTIN_ORDER.index(stage)
        return cls(stage, after=BUILTIN_ORDER[:i], before=BUILTIN_ORDER[i + 1 :])


def precedence(placements: Iterable[Placement]) -> dict[str, set[str]]:
    """Return `must_precede[s]`: every stage that must come before stage `s`.

    The graph is the built-in chain plus every given placement, closed transitively.

    Raises:
        ValueError: if the rules contradict each other (a cycle); the caller turns it into a
            `PipelineOrderError` naming the stages.
    """
    edges: dict[str, set[str]] = {s: set() for s in BUILTIN_ORDER}  # edges[b] = {a: a before b}
    for a, b in itertools.pairwise(BUILTIN_ORDER):
        edges[b].add(a)
    for p in placements:
        edges.setdefault(p.stage, set())
        for a in p.after:
            edges[p.stage].add(a)
            edges.setdefault(a, set())
        for b in p.before:
            edges.setdefault(b, set()).add(p.stage)
    closure: dict[str, set[str]] = {}
    for s in edges:
        seen: set[str] = set()
        stack = list(edges[s])
        while stack:
            a = stack.pop()
            if a not in seen:
                seen.add(a)
                stack.extend(edges.get(a, ()))
        closure[s] = seen
    cyclic = sorted(s for s, pre in closure.items() if s in pre)
    if cyclic:
        raise ValueError(f"the ordering rules form a cycle through stages {cyclic}")
    return closure


def stable_sort(stages: Sequence[str], must_precede: dict[str, set[str]]) -> list[int]:
    """Indices of `stages` in an order that obeys `must_precede`, otherwise keeping input order."""
    remaining = list(range(len(stages)))
    out: list[int] = []
    while remaining:
        for i in remaining:
            blockers = must_precede.get(stages[i], set())
            if not any(stages[j] in blockers for j in remaining if j != i):
                out.append(i)
                remaining.remove(i)
                break
        else:  # pragma: no cover - precedence() already rejected cycles
            raise ValueError("cycle")
    return out


def chain_text(stages: Iterable[str], must_precede: dict[str, set[str]]) -> str:
    """Render the rule over `stages` as ``tp -> cp -> ep -> ac -> compile -> fsdp``."""
    present = list(dict.fromkeys(stages))
    known = [s for s in BUILTIN_ORDER if s not in present] + present
    order = [known[i] for i in stable_sort(known, must_precede)]
    return " -> ".join(order)
