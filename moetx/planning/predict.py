"""`predict`: per-rank memory, communication and FLOPs of one (model, degrees, pipeline, batch)."""

from __future__ import annotations

from collections.abc import Callable

import attrs
from torch import nn

from moetx.core.algebra import Pass, Pipeline
from moetx.core.errors import PlanningError
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import MoEConfig
from moetx.planning.predict_activations import BlockTrace, ep_trace_degree, trace_blocks
from moetx.planning.predict_comm import Routing, Traffic, predict_comm
from moetx.planning.predict_flops import predict_flops
from moetx.planning.predict_fsdp import fsdp_resident, fsdp_units
from moetx.planning.predict_state import ModelShapes, find_pass, iter_blocks, state_bytes
from moetx.planning.report import RankBytes, human_bytes

__all__ = ["Prediction", "activation_bytes", "human_flops", "predict"]

#: The stages whose memory and collectives `predict` models (others are refused).
MODELLED: tuple[str, ...] = ("tp", "cp", "ep", "ac", "fsdp")

#: (cp pass, cp degree, ac pass or None, tp pass or None, tp degree, ep pass or None, ep degree
#: to trace at: `ep_trace_degree`) -> trace; the planner's cache.
Tracer = Callable[[Pass | None, int, Pass | None, Pass | None, int, Pass | None, int], BlockTrace]


@attrs.frozen
class Prediction:
    """What one rank holds and moves in one step (one forward + backward of a micro-batch).

    Attributes:
        state: Parameters, gradients and AdamW state (exact: FSDP2/DTensor chunking).
        activations: Bytes forward leaves resident for backward (traced; uniform routing).
        fsdp_transient: Gathered parameters of the largest FSDP units: the one computing and
            the ones prefetched (`FSDP(prefetch=N)`, at least one): an estimate of FSDP2's
            peak all-gather buffers.
        fsdp_resident: Gathered parameters `FSDP(reshard_after_forward=False | int | "auto")`
            keeps from forward to backward (as `Plan.resident_after_forward`; 0 when every
            unit reshards).
        comm: Collective bytes sent per step, per kind and axis.
        tokens: Tokens this rank processes per step.
        flops: FLOPs per step (forward, backward, recomputation), uniform routing.
        flops_worst: The same for the most loaded ep rank (every routable copy on its experts).
    """

    state: RankBytes
    activations: int
    fsdp_transient: int
    fsdp_resident: int
    comm: tuple[Traffic, ...]
    tokens: int
    flops: int
    flops_worst: int

    @property
    def memory(self) -> int:
        """Predicted peak bytes per rank: state + activations + FSDP transient buffers."""
        return self.state.total + self.activations + self.fsdp_transient + self.fsdp_resident

    @property
    def bytes_moved(self) -> int:
        """Collective bytes this rank sends per step (expected routing)."""
        return sum(t.bytes for t in self.comm)

    @property
    def bytes_moved_worst(self) -> int:
        """Collective bytes per step with the worst routing."""
        return sum(t.worst_bytes for t in self.comm)

    @property
    def bytes_per_token(self) -> float:
        """`bytes_moved / tokens`: the default ranking cost."""
        return self.bytes_moved / max(self.tokens, 1)

    def __str__(self) -> str:
        comm = ", ".join(f"{t.kind}[{t.axis}] {human_bytes(t.bytes)}" for t in self.comm) or "none"
        return (
            f"memory {human_bytes(self.memory)} (state {human_bytes(self.state.total)}, "
            f"activations {human_bytes(self.activations)}, FSDP buffers "
            f"{human_bytes(self.fsdp_transient)} + kept gathered {human_bytes(self.fsdp_resident)}); sends {human_bytes(self.bytes_moved)}/step "
            f"({comm}); {human_flops(self.flops)}/step (worst rank {human_flops(self.flops_worst)})"
        )


def human_flops(n: int) -> str:
    """`n` FLOPs with a decimal prefix (PFLOP, TFLOP, GFLOP, MFLOP), three significant digits."""
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} FLOP"


def activation_bytes(
    trace_none: BlockTrace, trace_ac: BlockTrace | None, shapes: ModelShapes, pipeline: Pipeline
) -> int:
    """Sum the traced per-block bytes over the model's blocks, checkpointed or not by `every`."""
    ac = find_pass(pipeline, "ac")
    every = getattr(ac, "every", 1)
    total = trace_none.outside
    for i, kind in iter_blocks(shapes):
        checkpointed = trace_ac is not None and (i + 1) % every == 0
        total += (trace_ac if checkpointed and trace_ac is not None else trace_none).blocks.get(
            kind, 0
        )
    return total


def _transient(shapes: ModelShapes, degrees: MeshDegrees, pipeline: Pipeline) -> int:
    units = fsdp_units(shapes, degrees, pipeline)
    # The unit computing plus those gathered ahead of it: FSDP2's implicit prefetch keeps one,
    # `FSDP(prefetch=N)` keeps N.
    fsdp = find_pass(pipeline, "fsdp")
    held = 1 + max(1, getattr(fsdp, "prefetch", 1))
    gathered = sorted(
        (
            u.mesh_size * u.shard_bytes
            for u in units
            if u.mesh_size > 1
            for _ in range(min(u.count, held))
        ),
        reverse=True,
    )
    return sum(gathered[:held])


def predict(
    model: nn.Module | MoEConfig | ModelShapes,
    degrees: MeshDegrees,
    pipeline: Pipeline | Pass,
    *,
    seq: int,
    micro_batch: int = 1,
    routing: Routing | None = None,
    ep_rank: int = 0,
    tracer: Tracer | None = None,
) -> Prediction:
    """Predict one rank's memory, communication and FLOPs for one training step.

    Raises:
        ValueError: A pass (or a mesh axis) the predictors do not model.

    Args:
        model: A `MoEConfig`, a module (any device; a meta copy is traced), or `ModelShapes`
            (whose `config` is traced).
        degrees: Mesh degrees.
        pipeline: The passes.
        seq: Global sequence length.
        micro_batch: Rows per data rank.
        routing: Token copies per MoE layer between ep ranks (`predict_comm`); None: uniform.
        ep_rank: This rank's position in its ep group (with `routing`).
        tracer: A cache of traces (the planner's); None traces here.
    """
    if isinstance(pipeline, Pass):
        pipeline = Pipeline() | pipeline
    unknown = [p for p in pipeline if p.placement.stage not in MODELLED]
    tp = find_pass(pipeline, "tp")
    if unknown or (degrees.tp > 1 and tp is None):
        what = repr(unknown[0]) if unknown else f"tp={degrees.tp} without TensorParallel"
        fix = "use `Pipeline.plan` for parameter bytes of other passes."
        if unknown and unknown[0].placement.stage == "compile":
            fix = (
                "predict the pipeline without it for parameters and collectives (a "
                "compiled block issues the eager block's collectives); what a compiled block "
                "saves for backward is the compiler's choice, which the meta trace cannot see."
            )
        raise PlanningError(
            f"`predict` models {MODELLED} only, not {what}: its bytes would be wrong.\n  fix: {fix}"
        )
    shapes = model if isinstance(model, ModelShapes) else ModelShapes.of(model)
    if tp is not None and not shapes.tp_legal(degrees.tp):
        raise PlanningError(
            f"`TensorParallel` cannot shard this model over tp={degrees.tp} "
            f"({shapes.tp.refused or f'sizes {shapes.tp.sizes} must all be divisible'}).\n"
            "  fix: pick a tp degree that divides them, or leave TensorParallel out."
        )
    source: nn.Module | MoEConfig | None = (
        shapes.config if isinstance(model, ModelShapes) else model
    )
    cp, ac, ep = find_pass(pipeline, "cp"), find_pass(pipeline, "ac"), find_pass(pipeline, "ep")
    ep_degree = ep_trace_degree(ep, degrees.ep, shapes.num_experts)

    def trace(cp_: Pass | None, degree: int, ac_: Pass | None) -> BlockTrace:
        if tracer is not None:
            return tracer(cp_, degree, ac_, tp, degrees.tp, ep, ep_degree)
        assert source is not None, "ModelShapes without a config: pass the model"
        return trace_blocks(
            source, micro_batch=micro_batch, seq=seq, ac=ac_, cp=cp_, cp_degree=degree,
            tp=tp, tp_degree=degrees.tp, ep=ep, ep_degree=ep_degree,
        )  # fmt: skip

    none = trace(cp, degrees.cp, None)
    with_ac = trace(cp, degrees.cp, ac) if ac is not None else None
    flops, worst = predict_flops(none, shapes, degrees, pipeline)
    return Prediction(
        state=state_bytes(shapes, degrees, pipeline),
        activations=activation_bytes(none, with_ac, shapes, pipeline),
        fsdp_transient=_transient(shapes, degrees, pipeline),
        fsdp_resident=fsdp_resident(shapes, degrees, pipeline),
        comm=predict_comm(
            shapes,
            degrees,
            pipeline,
            micro_batch=micro_batch,
            seq=seq,
            routing=routing,
            ep_rank=ep_rank,
        ),
        tokens=micro_batch * (seq // degrees.cp),
        flops=flops,
        flops_worst=worst,
    )
