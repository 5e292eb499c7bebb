"""`TraceCache`: the planner's meta traces, each made once, and tensor-parallel ones composed from cheap ones.

A trace (`trace_blocks`) costs a forward on `meta`, most of it the routed experts' loop: one
matmul chain per local expert, 256 per MoE block on DeepSeek-V3 without expert parallelism.
`autoplan` asks for one per cp pass and degree, tp pass and degree, ep pass and trace degree,
and checkpointing mode; tensor parallelism multiplies the count (tp 2, 4, 8, each with and
without sequence parallelism).

`TensorParallel` never touches the routed experts, and expert parallelism nothing else:
`TensorParallel` shards attention, dense MLPs, shared experts and the vocabulary and leaves the
routers and routed experts replicated (every tp rank routes and computes the same tokens on the
same tensors), and `ExpertParallel` rewrites only the routed experts' dispatch. So what a tp rank
keeps and computes is the tp = 1 trace with the same dispatcher, plus what tp changes, which is
the same whichever dispatcher the experts use. The cache measures that change with the cheapest
dispatcher, all-to-all at `ep_trace_degree` (few local experts), and adds it field by field::

    trace(tp=T, dispatcher) = trace(tp=1, dispatcher) + trace(tp=T, a2a) - trace(tp=1, a2a)

(same cp pass and degree and checkpointing mode in all four). Each term is a sum over op
outputs: FLOPs add; bytes add too, as a storage the tp regions and the routed experts both keep
(the MoE block's input, which the router saves in every variant) is kept in all four traces. The
preconditions carry over as well: tp's are checked in the tp term, the dispatcher's in the
tp = 1 term (they read the expert count and ep degree, never tp), and a term that is refused
makes the cache trace the key whole, as it is. `tests/test_autoplan_variants.py` checks every
cp form x tp form x dispatcher x checkpointing mode against `trace_blocks` on the key whole
(moetx's model, Hugging Face Qwen3-MoE and DeepSeek-V3); on DeepSeek-V3 with tp allowed at
world 256 and 1024, every one of the 1,170 / 2,370 predicted candidates equals its prediction
with every key traced whole (`benchmarks/autoplan_time.py` says how it was checked).
"""

from __future__ import annotations

from typing import Any

import attrs
from torch import nn

from moetx.core.algebra import Pass
from moetx.core.errors import MoetxError
from moetx.models import MoEConfig
from moetx.passes import ActivationCheckpoint, ExpertParallel
from moetx.planning.predict_activations import (
    UNTRACEABLE,
    BlockTrace,
    ep_trace_degree,
    trace_blocks,
    traced_model,
    traced_pipeline,
)
from moetx.planning.refusal import refusal

__all__ = ["TraceCache", "compose"]

#: The dispatcher whose trace measures what tensor parallelism changes (see the module docstring).
_CHEAP = ExpertParallel()


class TraceCache:
    """A `predict` tracer (`moetx.planning.predict.Tracer`) that traces each key once.

    The key holds every pass that changes what a block keeps (ring vs all-gather CP, sequence
    parallelism, the dispatcher), not only its degree, and the checkpointing mode (every block:
    `predict` applies `every` itself). A pass that refuses the model is remembered and raised
    again for the same key; where its checks decide that from the mesh's degrees
    (`moetx.planning.refusal`: ContextParallel and an MTP head, sequence parallelism and one),
    on a meta copy of the model made once, without the key's fake world.

    Args:
        source: The model or `MoEConfig` to trace.
        micro_batch: Rows per rank.
        seq: Global sequence length.
        experts: The model's routed expert count (0: none; tp traces are then made whole).
    """

    def __init__(
        self, source: nn.Module | MoEConfig, *, micro_batch: int, seq: int, experts: int
    ) -> None:
        self.source = source
        self.micro_batch = micro_batch
        self.seq = seq
        try:
            cheap = ep_trace_degree(_CHEAP, 2, experts)
        except ValueError:  # no expert count it divides (no experts, or a prime above 16)
            cheap = 1
        self._cheap: tuple[Pass, int] | None = (_CHEAP, cheap) if cheap > 1 else None
        self._traces: dict[tuple[object, ...], BlockTrace | MoetxError] = {}
        #: What the passes' checks run on before a trace (`_refusal`), made on first use.
        self._checked: nn.Module | None = None
        #: Traces run (`trace_blocks` calls), keys composed without one, and keys refused
        #: without one (their passes' checks decided it from the degrees).
        self.traced = 0
        self.composed = 0
        self.refused = 0

    def __call__(
        self, cp: Pass | None, degree: int, ac: Pass | None, tp: Pass | None, tp_degree: int,
        ep: Pass | None, ep_degree: int,
    ) -> BlockTrace:  # fmt: skip
        """The trace for these passes and degrees (the `Tracer` signature); raises the pass's
        `MoetxError` if one refuses the model."""
        every = attrs.evolve(ac, every=1) if isinstance(ac, ActivationCheckpoint) else ac
        cp, tp = (cp if degree > 1 else None), (tp if tp_degree > 1 else None)
        degree, tp_degree = (degree if cp is not None else 1), (tp_degree if tp is not None else 1)
        ep, ep_degree = (ep, ep_degree) if ep is not None and ep_degree > 1 else (None, 1)
        key = (cp, degree, every, tp, tp_degree, ep, ep_degree)
        if key not in self._traces:
            self._traces[key] = self._make(cp, degree, every, tp, tp_degree, ep, ep_degree)
        found = self._traces[key]
        if isinstance(found, MoetxError):
            # without its old traceback: raised again per candidate (tens of thousands when CP
            # refuses the model), it would otherwise grow and keep every frame it passed alive
            raise found.with_traceback(None)
        return found

    def _make(
        self, cp: Pass | None, degree: int, ac: Pass | None, tp: Pass | None, tp_degree: int,
        ep: Pass | None, ep_degree: int,
    ) -> BlockTrace | MoetxError:  # fmt: skip
        if tp is not None and self._cheap is not None and (ep, ep_degree) != self._cheap:
            try:  # the term with tp and cp first: where they refuse, before the others trace
                with_tp = self(cp, degree, ac, tp, tp_degree, *self._cheap)
                base = self(cp, degree, ac, None, 1, ep, ep_degree)
                without = self(cp, degree, ac, None, 1, *self._cheap)
            except MoetxError:
                pass  # a term is refused: trace the key whole, which says whether it is too
            else:
                composed = compose(base, with_tp, without)
                if composed is not None:
                    self.composed += 1
                    return composed
        early = self._refusal(cp, degree, ac, tp, tp_degree, ep, ep_degree)
        if early is not None:
            self.refused += 1
            return early
        self.traced += 1
        try:
            return trace_blocks(
                self.source, micro_batch=self.micro_batch, seq=self.seq, ac=ac, cp=cp,
                cp_degree=degree, tp=tp, tp_degree=tp_degree, ep=ep, ep_degree=ep_degree,
            )  # fmt: skip
        except MoetxError as e:  # a pass refuses this model (e.g. CP with an MTP head)
            return e

    def _refusal(
        self, cp: Pass | None, degree: int, ac: Pass | None, tp: Pass | None, tp_degree: int,
        ep: Pass | None, ep_degree: int,
    ) -> MoetxError | None:  # fmt: skip
        """The error `trace_blocks` refuses this key with, if its passes' checks decide it from
        the degrees (`refusal`); None: trace it (which checks again, on the built mesh)."""
        if self._checked is None:
            # checks never change the model they are given, so one copy serves every key
            try:
                self._checked = traced_model(self.source)
            except Exception:  # the trace makes the same copy, and reports what this met
                return None
        passes, degrees = traced_pipeline(ac, cp, degree, tp, tp_degree, ep, ep_degree)
        error = refusal(self._checked, passes, degrees)
        # what `trace_blocks` reports as "cannot trace" (a `PlanningError`) is left to it
        return None if isinstance(error, UNTRACEABLE) else error


def compose(base: BlockTrace, plus: BlockTrace, minus: BlockTrace) -> BlockTrace | None:
    """`base + plus - minus`, field by field (ints, and dicts of them, nested: bytes and FLOPs
    by block kind, recomputed FLOPs by mode and kind); None if a field is of another kind."""
    fields: dict[str, Any] = {}
    for f in attrs.fields(BlockTrace):
        value = _combine(*(getattr(t, f.name) for t in (base, plus, minus)))
        if value is None:
            return None
        fields[f.name] = value
    return BlockTrace(**fields)


def _combine(a: Any, b: Any, c: Any) -> Any:
    """`a + b - c` for ints, key by key (a missing key is 0) for dicts of them; None otherwise."""
    if all(isinstance(v, int) for v in (a, b, c)):
        return a + b - c
    if not all(isinstance(v, dict) for v in (a, b, c)):
        return None
    keys = [*a, *(k for k in b if k not in a), *(k for k in c if k not in a and k not in b)]
    out = {}
    for k in keys:
        zero = next(t[k] for t in (a, b, c) if k in t)
        zero = 0 if isinstance(zero, int) else {}
        value = _combine(a.get(k, zero), b.get(k, zero), c.get(k, zero))
        if value is None:
            return None
        out[k] = value
    return out
