"""FLOPs per rank per step: the traced forward, backward at twice that, and what checkpointing reruns.

Recomputation is what `BlockTrace.recompute_flops` traced for the block's checkpoint mode: a
checkpointed block reruns its forward up to its last saved tensor (torch's non-reentrant
checkpoint stops there), less the outputs its mode saved (a router's; "selective": matmuls and
attention too), so it is never a whole forward.
"""

from __future__ import annotations

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.planning.predict_activations import BlockTrace
from moetx.planning.predict_state import ModelShapes, find_pass, iter_blocks

__all__ = ["checkpoint_mode", "predict_flops"]


def checkpoint_mode(pipeline: Pipeline, block: int) -> str | None:
    """The `ActivationCheckpoint` mode block `block` runs under (None: not checkpointed)."""
    ac = find_pass(pipeline, "ac")
    if ac is None or (block + 1) % getattr(ac, "every", 1):
        return None
    return str(getattr(ac, "mode", "full"))


def predict_flops(
    trace: BlockTrace, shapes: ModelShapes, degrees: MeshDegrees, pipeline: Pipeline
) -> tuple[int, int]:
    """(expected, worst) FLOPs per rank per step: forward, backward (2x), recomputation.

    `trace` is one without checkpointing (`trace_blocks(..., ac=None)`). Its expert FLOPs are
    those of this rank's tokens under uniform routing, which is what an ep rank computes on
    average; the worst rank receives `ep · min(k, E / ep) / k` times that, in forward, backward
    and recomputation alike.
    """
    forward, recompute, experts = trace.flops_outside, 0, 0
    for i, kind in iter_blocks(shapes):
        forward += trace.flops.get(kind, 0)
        if i in shapes.moe_blocks:
            experts += 3 * trace.expert_flops
        mode = checkpoint_mode(pipeline, i)
        if mode is not None:
            recompute += trace.recompute_flops[mode].get(kind, 0)
            experts += trace.recompute_expert_flops[mode].get(kind, 0)
    expected = 3 * forward + recompute
    worst = expected
    if find_pass(pipeline, "ep") is not None and degrees.ep > 1 and shapes.top_k:
        ratio = degrees.ep * min(shapes.top_k, shapes.num_experts // degrees.ep) / shapes.top_k
        worst += int((ratio - 1) * experts)
    return expected, worst
