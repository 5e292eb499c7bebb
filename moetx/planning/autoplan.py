"""`autoplan`: the meshes and pipelines that fit a memory budget, ranked by bytes moved per token.

1. Enumerate legal degrees (`moetx.planning.enumeration.degree_options`: every factorisation
   of the world into dp_replicate × cp × dp_shard × tp, tp innermost and dividing every head
   count, MLP width and the vocabulary, with ep dividing dp_shard × cp and the expert count)
   and, for each, the pipelines the allowed passes make (`pipelines`: tp, cp and ep whenever
   their degree is above 1, ep with the all-to-all dispatcher and, where ep < top_k, the
   all-gather one, which then sends fewer bytes; each allowed checkpointing mode, selective
   with tp too).
2. Prune by parameter + gradient + AdamW bytes (`predict_state`, no tracing) before anything else.
3. Predict activations (one meta trace per cp, ep trace degree, dispatcher and checkpointing
   mode, cached; a tensor-parallel one composed from it and a cheap all-to-all trace at that
   tp degree, `moetx.planning.trace_cache`), FSDP buffers, communication and FLOPs
   (`predict`) for the rest. A pass that refuses the model (ContextParallel and an MTP head)
   leaves its candidates out (`AutoPlan.refused`), found by the passes' checks on the mesh
   degrees before any trace (`moetx.planning.refusal`).
   FSDP's reshard policy is a candidate dimension (`fsdp_options`: "auto" and True by
   default); the gathered bytes "auto" keeps per rank are in the memory and the table.
4. Rank what fits by `CostModel.cost`: by default bytes sent per token per rank; give bandwidths
   and a latency to rank by modelled seconds per token instead. Ties go to less memory.

When nothing fits, the result says so (`AutoPlan.fits` is empty; `AutoPlan.best` raises
`NoFittingPlanError` naming the smallest candidate and by how much it misses).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import attrs
from torch import nn

from moetx.core.algebra import Pipeline
from moetx.core.errors import MoetxError, PlanningError
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import MoEConfig
from moetx.passes import (
    FSDP,
)
from moetx.planning.enumeration import degree_options, pipelines
from moetx.planning.predict import Prediction, human_flops, predict
from moetx.planning.predict_comm import Traffic
from moetx.planning.predict_state import ModelShapes, state_bytes
from moetx.planning.report import human_bytes
from moetx.planning.trace_cache import TraceCache

__all__ = [
    "AC_MODES",
    "FSDP_OPTIONS",
    "AutoPlan",
    "Candidate",
    "CostModel",
    "NoFittingPlanError",
    "autoplan",
]

#: Checkpointing choices: none, a mode on every block, or a mode on every 2nd block.
AC_MODES: tuple[str, ...] = ("none", "router", "selective", "full", "full/2")
PASSES: tuple[str, ...] = ("tp", "cp", "ep", "ac", "fsdp")
#: Those tried unless told: tensor parallelism is opt-in (each tp degree costs a cheap meta trace
#: per checkpointing mode; on DeepSeek-V3 at world 1024 the candidates go from 5,845 to 31,605
#: and ~6 s of CPU to ~14 s: `benchmarks/autoplan_time.py`).
DEFAULT_PASSES: tuple[str, ...] = ("cp", "ep", "ac", "fsdp")
#: The reshard policies tried by default: units kept gathered while they fit the rank's sharded
#: training state (one all-gather per unit and step), or every unit resharded (two; less memory).
FSDP_OPTIONS: tuple[FSDP, ...] = (
    FSDP(reshard_after_forward="auto"),
    FSDP(reshard_after_forward=True),
)


class NoFittingPlanError(MoetxError, ValueError):
    """No candidate fits the memory budget."""


@attrs.frozen(kw_only=True)
class CostModel:
    """Seconds per step of a rank's collectives: `latency · calls + bytes / bandwidth`.

    The default (bandwidth 1 B/s everywhere, no latency) makes the cost the bytes sent, so the
    planner ranks by bytes moved per token. `bandwidth` may map axes (`dp_shard_cp`, `ep_fsdp`,
    `dp_replicate`, `ep`, `cp`) to bytes/s, with `"*"` for the others.
    """

    bandwidth: float | Mapping[str, float] = 1.0
    latency: float = 0.0

    def seconds(self, comm: Sequence[Traffic]) -> float:
        """Modelled communication time of one step."""
        total = 0.0
        for t in comm:
            bw = self.bandwidth
            if isinstance(bw, Mapping):
                bw = bw.get(t.axis, bw.get("*", 1.0))
            total += t.calls * self.latency + t.bytes / bw
        return total

    def cost(self, p: Prediction) -> float:
        """The ranking cost: modelled communication per token."""
        return self.seconds(p.comm) / max(p.tokens, 1)


@attrs.frozen
class Candidate:
    """A ready `(pipeline, degrees)` and what it is predicted to cost."""

    pipeline: Pipeline
    degrees: MeshDegrees
    prediction: Prediction
    cost: float

    def __str__(self) -> str:
        d = self.degrees
        return (
            f"{self.pipeline!r} on dp_replicate={d.dp_replicate} dp_shard={d.dp_shard} "
            f"cp={d.cp} ep={d.ep}{f' tp={d.tp}' if d.tp > 1 else ''}: {self.prediction}"
        )


@attrs.frozen
class AutoPlan:
    """The candidates that fit (best first), and the closest miss when none does.

    Attributes:
        fits: Candidates within the budget, ranked by cost, then memory.
        misses: The fully predicted candidates over the budget, smallest memory first.
        closest: The smallest-memory candidate that was fully predicted (None if every
            candidate's parameter state alone exceeded the budget; see `smallest_state`).
        smallest_state: The smallest parameter + gradient + AdamW bytes of any candidate.
        budget: The memory per rank asked for.
        considered: Candidates enumerated; `pruned` of them by their state bytes alone.
        refused: Why some passes refused the model (one line per error kind; e.g. CP and an
            MTP head): those candidates are left out.
        seconds: Wall time.
    """

    fits: tuple[Candidate, ...]
    closest: Candidate | None
    misses: tuple[Candidate, ...]
    smallest_state: int
    budget: int
    considered: int
    pruned: int
    refused: tuple[str, ...] = ()
    seconds: float = attrs.field(default=0.0, eq=False)

    @property
    def best(self) -> Candidate:
        """The top candidate; raises `NoFittingPlanError` when nothing fits."""
        if self.fits:
            return self.fits[0]
        raise NoFittingPlanError(self.miss())

    def miss(self) -> str:
        """Why nothing fits: the smallest candidate and by how much it misses."""
        if self.closest is not None:
            over = self.closest.prediction.memory - self.budget
            return (
                f"No mesh and pipeline fits {human_bytes(self.budget)} per rank "
                f"({self.considered} candidates); the smallest needs "
                f"{human_bytes(self.closest.prediction.memory)} (+{human_bytes(over)}): "
                f"{self.closest}"
            )
        over = self.smallest_state - self.budget
        return (
            f"No mesh and pipeline fits {human_bytes(self.budget)} per rank "
            f"({self.considered} candidates); parameters, gradients and AdamW state alone need "
            f"at least {human_bytes(self.smallest_state)} (+{human_bytes(over)})."
        )

    def frontier(self) -> tuple[Candidate, ...]:
        """The fitting candidates no other beats on both memory and cost, by memory."""
        out: list[Candidate] = []
        for c in sorted(self.fits, key=lambda c: (c.prediction.memory, c.cost)):
            if not out or c.cost < out[-1].cost:
                out.append(c)
        return tuple(out)

    def table(self, top: int = 10) -> str:
        """A markdown table of the `top` candidates."""
        rows = [
            "| # | pipeline | dp_rep | dp_shard | cp | ep | tp | memory | activations "
            "| kept gathered | bytes/token | sent/step (worst) | FLOP/step (worst) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, c in enumerate(self.fits[:top], 1):
            d, p = c.degrees, c.prediction
            pipe = repr(c.pipeline).replace("|", "\\|")  # a `|` would end the table cell
            rows.append(
                f"| {i} | `{pipe}` | {d.dp_replicate} | {d.dp_shard} | {d.cp} | {d.ep} | {d.tp} "
                f"| {human_bytes(p.memory)} | {human_bytes(p.activations)} "
                f"| {human_bytes(p.fsdp_resident)} | {p.bytes_per_token:,.0f} | {human_bytes(p.bytes_moved)} "
                f"({human_bytes(p.bytes_moved_worst)}) | {human_flops(p.flops)} "
                f"({human_flops(p.flops_worst)}) |"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        head = (
            f"autoplan: {len(self.fits)} of {self.considered} candidates fit "
            f"{human_bytes(self.budget)} per rank ({self.pruned} pruned by state bytes; "
            f"{self.seconds:.1f} s)"
        )
        notes = "".join(f"\nleft out: {r}" for r in self.refused)
        body = self.table() if self.fits else self.miss()
        return f"{head}\n{body}{notes}"


def autoplan(
    model: nn.Module | MoEConfig,
    *,
    world: int,
    memory_per_rank: int,
    seq: int,
    micro_batch: int = 1,
    passes_allowed: Sequence[str] = DEFAULT_PASSES,
    ac_modes: Sequence[str] = AC_MODES,
    cost: CostModel | None = None,
    max_cp: int = 8,
    max_tp: int = 8,
    fsdp_options: Sequence[FSDP] = FSDP_OPTIONS,
) -> AutoPlan:
    """Find the meshes and pipelines that fit `memory_per_rank`, ranked by `cost`.

    Args:
        model: A `MoEConfig` or a module (any device; only shapes are read, and a meta copy is
            traced).
        world: Number of ranks.
        memory_per_rank: Bytes each rank may use (parameters, gradients, AdamW state,
            activations and FSDP's gathered buffers).
        seq: Sequence length (global; context parallelism splits it).
        micro_batch: Rows per data rank per step.
        passes_allowed: Stages the planner may use, among `PASSES` (`("tp", "cp", "ep", "ac",
            "fsdp")`); default `DEFAULT_PASSES`, all but tp.
        ac_modes: Checkpointing choices among `AC_MODES` (`"full/2"`: every 2nd block).
        cost: The ranking `CostModel` (default: bytes sent per token).
        max_cp: The largest context-parallel degree tried.
        max_tp: The largest tensor-parallel degree tried (tp is the innermost axis; a degree
            is tried when it divides every head count, MLP width and the vocabulary).
        fsdp_options: The `FSDP` configurations tried (default: the reshard policies "auto"
            and True; e.g. add `FSDP(reshard_after_forward=False)`: more memory, no backward
            all-gathers). The table's `kept gathered` column is what the policy costs per rank.

    Returns:
        An `AutoPlan`: `.best` is the top `Candidate` (`.pipeline`, `.degrees`,
        `.prediction`), `.fits` all that fit, `.miss()` why nothing fits.

    Raises:
        ValueError: A pass or checkpointing mode outside `PASSES` / `AC_MODES`.

    Example:
        >>> from moetx.models import MoEConfig
        >>> result = autoplan(MoEConfig(), world=2, memory_per_rank=2**20, seq=8, ac_modes=["full"])
        >>> result.best.degrees.world_size, result.best.prediction.memory <= 2**20
        (2, True)
    """
    start = time.perf_counter()
    allowed = frozenset(passes_allowed)
    bad = sorted(allowed - set(PASSES)) + sorted(set(ac_modes) - set(AC_MODES))
    if bad:
        raise PlanningError(
            f"Unknown pass or checkpointing mode ({bad[0]!r}); use {PASSES} and {AC_MODES}."
        )
    cost = cost or CostModel()
    shapes = ModelShapes.of(model)
    tracer = TraceCache(model, micro_batch=micro_batch, seq=seq, experts=shapes.num_experts)

    fits: list[Candidate] = []
    misses: list[Candidate] = []
    considered = pruned = 0
    refused: dict[str, str] = {}
    smallest = None
    for degrees in degree_options(
        world, shapes=shapes, seq=seq, allowed=allowed, max_cp=max_cp, max_tp=max_tp
    ):
        for pipeline in pipelines(degrees, allowed, ac_modes, fsdp_options, shapes.top_k):
            considered += 1
            state = state_bytes(shapes, degrees, pipeline).total
            smallest = state if smallest is None else min(smallest, state)
            if state > memory_per_rank:
                pruned += 1
                continue
            try:
                p = predict(
                    shapes, degrees, pipeline, seq=seq, micro_batch=micro_batch, tracer=tracer
                )
            except MoetxError as e:
                refused.setdefault(type(e).__name__, str(e).splitlines()[0])
                continue
            c = Candidate(pipeline, degrees, p, cost.cost(p))
            (fits if p.memory <= memory_per_rank else misses).append(c)
    fits.sort(key=lambda c: (c.cost, c.prediction.memory))
    misses.sort(key=lambda c: (c.prediction.memory, c.cost))
    return AutoPlan(
        fits=tuple(fits),
        closest=misses[0] if misses else None,
        misses=tuple(misses),
        smallest_state=smallest or 0,
        budget=memory_per_rank,
        considered=considered,
        pruned=pruned,
        refused=tuple(refused.values()),
        seconds=time.perf_counter() - start,
    )
