"""Rank bodies for the auto-planner tests (counted collectives, activations, routing) + checks."""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees, ParallelMesh
from moetx.planning import Traffic
from moetx.planning.meter import LiveActivationMeter
from moetx.structure.discovery import discover
from moetx.testing.hf import HFSpec
from moetx.testing.hf import build_model as hf_build_model
from moetx.testing.hf import global_batches as hf_global_batches
from moetx.testing.train import TrainSpec, build_model, mesh_for
from moetx.training.grad_sync import sync_gradients
from tests.bodies.plan import _batch

#: The axis a kind of collective is reported under when one group is several axes (e.g. the
#: world is also dp_shard_cp when dp_replicate is 1).
PREFER = {
    "fsdp_all_gather": ("dp_shard_cp", "ep_fsdp"),
    "fsdp_reduce_scatter": ("dp_shard_cp", "ep_fsdp"),
    "grad_all_reduce": ("world", "ep_fsdp"),
    "hsdp_all_reduce": ("dp_replicate",),
    "load_sync_all_reduce": ("world",),
    "cp_guard_all_reduce": ("world",),
    "aux_all_reduce": ("cp",),
    "aux_all_gather": ("cp",),
    "aux_reduce_scatter": ("cp",),
    "ep_all_to_all": ("ep",),
    "cp_all_gather": ("cp",),
    "cp_reduce_scatter": ("cp",),
    "tp_all_reduce": ("tp",),
    "tp_all_gather": ("tp",),
    "tp_reduce_scatter": ("tp",),
    "ep_all_gather": ("ep",),
    "ep_reduce_scatter": ("ep",),
}


#: The small collectives, named by the function that issues them (found on the Python stack):
#: the routing-load counters' sum (`moetx.passes.load_sync`), CP's aux-loss statistics
#: (`StatsReducer`, HF's `AuxLossReducer`), the HF CP batch check (`_BatchGuard`), and TP's sum
#: of a latent attention's rotary-key gradient (`tensor_parallel.latent`, in backward).
ISSUERS = {
    "_reduce_increment.<locals>.hook": "load_sync",
    "StatsReducer.__call__": "aux",
    "AuxLossReducer.__call__": "aux",
    "_BatchGuard.__call__": "cp_guard",
    "_SumSliceGradOverTP.backward": "tp",
}


def _issuer() -> str | None:
    """The `ISSUERS` prefix of the moetx function on the stack that issued this collective."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        name = ISSUERS.get(code.co_qualname)
        if name is not None and "moetx" in code.co_filename:
            return name
        frame = frame.f_back
    return None


def _axes(mesh: ParallelMesh) -> dict[str, list[str]]:
    """Process-group name (and member ranks) -> the axes whose group it is."""
    names: dict[str, list[str]] = {}
    for axis, dm in (
        ("dp_shard_cp", mesh["dp_shard_cp"]),
        ("ep_fsdp", mesh.expert_fsdp_mesh()),
        ("ep", mesh["ep"]),
        ("cp", mesh["cp"]),
        ("dp_replicate", mesh["dp_replicate"]),
        ("world", mesh.tokens if mesh.degrees.tp > 1 else mesh.root),  # sync_gradients' group
        *[("world", mesh.root)] * (mesh.degrees.tp > 1),  # HF CP's batch check: every rank
        *[("tp", dm["tp"]) for dm in (mesh.dense, mesh.fsdp, mesh.moe) if mesh.degrees.tp > 1],
    ):
        group = dm.get_group()
        names.setdefault(group.group_name, []).append(axis)
        # DTensor may issue on another group with the same ranks (e.g. a tp mesh sliced apart)
        names.setdefault(str(dist.get_process_group_ranks(group)), []).append(axis)
    return names


class CountingMode(TorchDispatchMode):
    """Counts every collective a step issues: calls and bytes this rank sends, per (kind, axis).

    Bytes follow the planner's convention: all-gather `(w-1)·input`, reduce-scatter
    `(w-1)/w·input`, ring all-reduce `2(w-1)/w·size`, all-to-all the rows sent to other ranks.
    Sees FSDP2's c10d ops (`_allgather_base_`, `_reduce_scatter_base_`, `allreduce_`) and the
    functional ones (`_c10d_functional.*`) that EP and CP issue. The small ones issued in forward
    by the functions in `ISSUERS` are named after them (`load_sync_all_reduce`, `aux_*`,
    `cp_guard_all_reduce`); the reduce-scatter backward runs for an aux-loss all-gather (in C++,
    no issuer on the stack) is told from CP's K/V ones by its shape: a float `[rows, E]` or `[E]`
    where K/V are 5-D.
    """

    def __init__(self, axes: dict[str, list[str]]) -> None:
        super().__init__()
        self.axes = axes
        self.log: defaultdict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self.c10d: defaultdict[str, int] = defaultdict(int)
        self.all_reduce: str | None = None  # what all-reduces are, when the caller knows
        self.ep_gathers = False  # all-gathers on the ep group are EP's (all-gather dispatcher)

    def comm(self) -> dict[str, tuple[int, int]]:
        """What was counted, `"kind[axis]" -> (calls, bytes)` (the keys of `predicted_comm`)."""
        return {f"{k}[{a}]": (calls, sent) for (k, a), (calls, sent) in self.log.items()}

    def _add(self, kind: str, pg: Any, sent: int) -> None:
        ranks = str(dist.get_process_group_ranks(pg))
        axes = self.axes.get(pg.group_name) or self.axes.get(ranks, [pg.group_name])
        axis = next((a for a in PREFER[kind] if a in axes), axes[0])
        row = self.log[(kind, axis)]
        row[0] += 1
        row[1] += sent

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        ns, name = func.namespace, func._overloadpacket.__name__
        if ns == "c10d":
            self.c10d[name] += 1
        if ns == "c10d" and name == "_allgather_base_":
            pg = _unbox(args[2])
            self._add("fsdp_all_gather", pg, (pg.size() - 1) * _nbytes(args[1]))
        elif ns == "c10d" and name == "_reduce_scatter_base_":
            pg = _unbox(args[2])
            self._add("fsdp_reduce_scatter", pg, (pg.size() - 1) * _nbytes(args[1]) // pg.size())
        elif ns == "c10d" and name == "allreduce_":
            pg = _unbox(args[1])
            w = pg.size()
            issuer = _issuer()
            kind = self.all_reduce or (f"{issuer}_all_reduce" if issuer else "hsdp_all_reduce")
            self._add(kind, pg, 2 * (w - 1) * sum(_nbytes(t) for t in args[0]) // w)
        elif ns == "_c10d_functional" and name == "all_to_all_single":
            x, pg = args[0], _resolve_process_group(args[3])
            me, w = dist.get_rank(pg), pg.size()
            splits = args[2] if args[2] is not None else [x.shape[0] // w] * w
            row = _nbytes(x) // x.shape[0] if x.shape[0] else 0
            self._add("ep_all_to_all", pg, sum(s for j, s in enumerate(splits) if j != me) * row)
        elif ns.startswith("_c10d_functional") and name == "all_gather_into_tensor":
            pg = _resolve_process_group(args[2])
            kind = self._on(pg, "all_gather", args[0])
            self._add(kind, pg, (pg.size() - 1) * _nbytes(args[0]))
        elif ns.startswith("_c10d_functional") and name == "reduce_scatter_tensor":
            pg = _resolve_process_group(args[3])
            sent = (pg.size() - 1) * _nbytes(args[0]) // pg.size()
            self._add(self._on(pg, "reduce_scatter", args[0]), pg, sent)
        elif ns == "_c10d_functional" and name == "all_reduce":  # DTensor's (tensor parallel)
            pg = _resolve_process_group(args[2])
            w = pg.size()
            issuer = _issuer()
            kind = f"{issuer}_all_reduce" if issuer else "tp_all_reduce"
            self._add(kind, pg, 2 * (w - 1) * _nbytes(args[0]) // w)
        return func(*args, **kwargs)

    def _on(self, pg: Any, what: str, x: torch.Tensor) -> str:
        """`tp_<what>` on the tp group (DTensor redistributions), `ep_<what>` the all-gather
        dispatcher's, `aux_<what>` the aux-loss statistics', else CP's `cp_<what>`."""
        axes = self.axes.get(pg.group_name) or self.axes.get(
            str(dist.get_process_group_ranks(pg)), []
        )
        prefix = "tp" if "tp" in axes else "ep" if self.ep_gathers and "ep" in axes else "cp"
        issuer = _issuer()
        if prefix == "cp" and (issuer == "aux" or (x.is_floating_point() and x.dim() <= 2)):
            prefix = "aux"
        return f"{prefix}_{what}"


def predicted_comm(comm: Iterable[Traffic]) -> dict[str, tuple[int, int]]:
    """The collectives a prediction's `comm` says a rank issues (calls > 0), keyed as
    `CountingMode.comm`: `"kind[axis]" -> (calls, bytes)`."""
    return {f"{t.kind}[{t.axis}]": (t.calls, t.bytes) for t in comm if t.calls}


def assert_counted_as_predicted(
    counted: Mapping[str, tuple[int, int]], comm: Iterable[Traffic], rank: int
) -> None:
    """Predicted == counted: every collective the prediction's `comm` has (calls > 0) was
    counted on `rank` (`CountingMode.comm`) with the same calls and bytes, per kind and axis,
    and every other kind counted sent no bytes."""
    want = predicted_comm(comm)
    got = {k: v for k, v in counted.items() if v[1] or k in want}
    assert got == want, f"rank {rank}: kind[axis]: (counted, predicted) " + str(
        {k: (got.get(k), want.get(k)) for k in sorted(got | want) if got.get(k) != want.get(k)}
    )


def drawn_routing(results: list[dict[str, Any]], rank: int) -> list[list[list[int]]]:
    """`predict`'s `routing` for `rank` from every rank's results (their `"sent"` per MoE layer
    and `"ep_ranks"`): per layer, what each rank of its ep group sent each of the group's ranks."""
    ranks = results[rank]["ep_ranks"]
    layers = len(results[rank]["sent"])
    return [[results[src]["sent"][layer] for src in ranks] for layer in range(layers)]


def _unbox(pg: Any) -> dist.ProcessGroup:
    return pg if isinstance(pg, dist.ProcessGroup) else dist.ProcessGroup.unbox(pg)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def counted_step(
    model: Any, batch: dict[str, Any], mesh: Any, pipeline: Pipeline, log: Any, *, meter: bool
) -> int:
    """One forward + backward (+ `sync_gradients` without FSDP) with every collective counted in
    `log`; returns the bytes forward leaves alive (`meter`; -1 without)."""
    live = LiveActivationMeter(exclude=[model, *batch.values()]) if meter else None
    with log:
        if live is not None:
            with live:
                out = model(**batch)
            activations = live.live_bytes(exclude=[out.logits, out.loss])
        else:
            out, activations = model(**batch), -1
        out.loss.backward()
        if not any(p.placement.stage == "fsdp" for p in pipeline):
            log.all_reduce = "grad_all_reduce"
            sync_gradients(model, mesh)
    return activations


def measure_step(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, *, meter: bool
) -> dict[str, Any]:
    """One forward + backward: counted collectives, routing sent per ep rank, activation bytes.

    `meter`: measure what forward leaves alive (only meaningful without FSDP, whose gathered
    parameters the meter would also see).
    """
    mesh = mesh_for(degrees)
    model = pipeline.apply(build_model(spec), mesh)
    batch = _batch(spec, pipeline, degrees)
    structure = discover(model)
    ep_degree = degrees.ep
    sent: dict[int, list[int]] = {}
    handles = []
    for layer, moe in enumerate(structure.moe_layers()):
        per_rank = moe.num_experts // ep_degree

        def hook(
            module: Any, args: Any, out: Any, layer: int = layer, per_rank: int = per_rank
        ) -> None:
            if layer not in sent:  # the forward's routing, not a recomputation's
                owner = out[0].reshape(-1) // per_rank
                sent[layer] = torch.bincount(owner, minlength=ep_degree).tolist()

        handles.append(moe.router.register_forward_hook(hook))
    log = CountingMode(_axes(mesh))
    log.ep_gathers = any(getattr(p, "dispatcher", "") == "all_gather" for p in pipeline)
    activations = counted_step(model, batch, mesh, pipeline, log, meter=meter)
    for h in handles:
        h.remove()
    ep_group = mesh["ep"].get_group()
    return {
        "comm": log.comm(),
        "activations": activations,
        "c10d": dict(log.c10d),
        "sent": [sent[i] for i in sorted(sent)],
        "ep_ranks": dist.get_process_group_ranks(ep_group),
        "ep_rank": dist.get_rank(ep_group),
    }


def hf_held_bytes(spec: HFSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, int]:
    """One AdamW step of the spec's HF model: bytes of local parameter, gradient and AdamW shards."""
    model = pipeline.apply(hf_build_model(spec), mesh_for(degrees))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr)
    ids, labels = hf_global_batches(spec, degrees.dp_replicate * degrees.dp_shard)[0]
    index = mesh_for(degrees).data_rank
    rows = slice(index * spec.rows_per_rank, (index + 1) * spec.rows_per_rank)
    model(input_ids=ids[rows], labels=labels[rows]).loss.backward()
    opt.step()
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return {
        "params": _local_bytes(model.parameters()),
        "grads": _local_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer": _local_bytes(moments),
    }


def _local_bytes(tensors: Any) -> int:
    out = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        out += local.numel() * local.element_size()
    return out
