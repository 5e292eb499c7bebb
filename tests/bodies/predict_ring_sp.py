"""Rank bodies for the ring-CP and sequence-parallel predictions: counted collectives (ring sends
included), measured activations, held parameter / gradient / AdamW bytes."""

from __future__ import annotations

from typing import Any

import torch

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.testing.train import TrainSpec, build_model, mesh_for
from tests.bodies.autoplan import PREFER, CountingMode, _axes, _nbytes, _unbox, counted_step
from tests.bodies.plan import _batch
from tests.bodies.plan import _nbytes as _held

__all__ = ["RingCountingMode", "ring_sp_step"]


class RingCountingMode(CountingMode):
    """`CountingMode` that also counts point-to-point sends (ring CP's K/V blocks and their
    gradient accumulators) as `cp_send`: one call and the tensor's bytes per `c10d.send`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace == "c10d" and func._overloadpacket.__name__ == "send":
            pg = _unbox(args[1])
            self._add("cp_send", pg, sum(_nbytes(t) for t in args[0]))
        return super().__torch_dispatch__(func, types, args, kwargs)


PREFER.setdefault("cp_send", ("cp",))


def ring_sp_step(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, *, meter: bool
) -> dict[str, Any]:
    """One forward + backward (+ `sync_gradients` without FSDP) and an AdamW step: the
    collectives of forward and backward counted per (kind, axis) as `{"kind[axis]": (calls,
    bytes)}`, the c10d op counts, the bytes forward leaves alive (`meter`; -1 without), and the
    bytes of the local parameter, gradient and AdamW-moment shards after the step."""
    mesh = mesh_for(degrees)
    model = pipeline.apply(build_model(spec), mesh)
    batch = _batch(spec, pipeline, degrees)
    log = RingCountingMode(_axes(mesh))
    activations = counted_step(model, batch, mesh, pipeline, log, meter=meter)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr)
    opt.step()
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return {
        "comm": log.comm(),
        "activations": activations,
        "c10d": dict(log.c10d),
        "params": _held(model.parameters()),
        "grads": _held(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer": _held(moments),
    }
