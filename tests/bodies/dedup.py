"""Rank bodies for `tests/test_dedup.py` and `benchmarks/dedup.py`: `ExpertParallel(dedup=True)`.

One MoE layer (the `MoECase` of the expert-parallel tests) with its dispatched rows and the bytes
its collectives send; a compiled MoE block; a training step's collectives with the (token, rank)
pairs each ep rank sent; and the interleaved dedup on / off benchmark.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import MoEConfig, MoETransformer, init_weights_
from moetx.passes.expert_parallel.api import ExpertParallel
from moetx.passes.expert_parallel.dedup import DedupAllToAllDispatcher
from moetx.structure.discovery import discover
from moetx.testing.parity import gradients, missing_gradients
from moetx.testing.train import TrainSpec, build_model, mesh_for
from tests.bodies.autoplan import CountingMode, _axes, counted_step
from tests.bodies.compile_ops import CollectiveRecorder, GraphCounter, _step
from tests.bodies.expert_parallel import MoECase, _CollectiveLog, moe_case_inputs, moe_case_model
from tests.bodies.plan import _batch


def _dedup_dispatch(
    moe: torch.nn.Module, hidden: torch.Tensor, mesh: Any, case: Any, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's routing of `hidden` and what the dedup dispatcher sends for it: (top-k
    expert index, dispatched rows, their expert ids)."""
    flat = hidden.detach().reshape(-1, case.hidden_size)
    with torch.no_grad():
        index, weights, _ = moe.gate(flat)
        dispatcher = DedupAllToAllDispatcher(
            group=mesh["ep"].get_group(),
            rank=rank,
            degree=case.degree,
            num_experts=case.num_experts,
        )
        tokens, expert_ids, _ = dispatcher.dispatch(flat, index, weights)
    return index, tokens, expert_ids


def remote_pairs(index: torch.Tensor, num_experts: int, degree: int) -> list[int]:
    """Distinct (token, rank) pairs per destination ep rank, from the routed `[T, k]` ids."""
    owner = index // (num_experts // degree)
    goes = torch.zeros(index.shape[0], degree, dtype=torch.bool).scatter_(1, owner, True)
    return goes.sum(0).tolist()  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ one MoE layer


def moe_layer_step(case: MoECase, dedup: bool = True) -> dict[str, Any]:
    """Rank body: EP (dedup or not) on one MoE layer, forward + backward on this rank's tokens.

    Returns the output, input gradient, every gradient, the rows `dispatch` hands the experts,
    the collectives (calls, bytes sent to other ranks) and the remote pairs / copies counted from
    the routing.
    """
    rank = dist.get_rank()
    mesh = mesh_for(MeshDegrees(dp_shard=case.degree, ep=case.degree))
    ep = ExpertParallel(dispatcher="all_to_all", dedup=dedup)
    model = ep.apply(moe_case_model(case), mesh)
    moe = discover(model).moe_layers()[0].module
    hidden, cotangent = moe_case_inputs(case, rank)
    hidden.requires_grad_(True)
    log = _CollectiveLog(rank, case.degree)
    with log:
        out, _ = moe(hidden)
        (out * cotangent).sum().backward()
    index, tokens, expert_ids = _dedup_dispatch(moe, hidden, mesh, case, rank)
    pairs = remote_pairs(index, case.num_experts, case.degree)
    received = torch.zeros(case.degree, dtype=torch.int64)
    dist.all_to_all_single(received, torch.tensor(pairs))
    owners = (index // (case.num_experts // case.degree)).reshape(-1)
    return {
        "out": out.detach(),
        "hidden_grad": hidden.grad,
        "grads": gradients(moe),
        "missing": sorted(n for n, p in moe.named_parameters() if p.grad is None),
        "dispatched": (tokens.clone(), expert_ids.clone()),
        "calls": dict(log.calls),
        "bytes": dict(log.bytes),
        "pairs_sent": sum(pairs) - pairs[rank],
        "pairs_received": int(received.sum() - received[rank]),
        "copies_sent": int((owners != rank).sum()),
    }


# --------------------------------------------------------------------------- compiled block


@attrs.frozen(kw_only=True)
class DedupBlock:
    """A compiled-block example: the second block (MoE) of a small synthetic model."""

    tokens: tuple[int, ...] = (6, 4)
    num_experts: int = 4
    top_k: int = 2
    routing_bias: bool = True
    fullgraph: bool = True
    seed: int = 0

    @property
    def config(self) -> MoEConfig:
        """Two backbone layers, the second MoE, one shared expert."""
        return MoEConfig(
            hidden_size=16,
            num_layers=2,
            num_dense_layers=1,
            num_experts=self.num_experts,
            top_k=self.top_k,
            num_shared_experts=1,
            routing_bias=self.routing_bias,
        )


def _block(case: DedupBlock) -> tuple[nn.Module, tuple[Any, ...], torch.Tensor]:
    rank, degree = dist.get_rank(), dist.get_world_size()
    model = MoETransformer(case.config)
    init_weights_(model, case.seed)
    mesh = mesh_for(MeshDegrees(dp_shard=degree, ep=degree))
    model = ExpertParallel(dedup=True).apply(model, mesh)
    block = model.model.layers[1]
    g = torch.Generator().manual_seed(1000 * case.seed + rank)
    t, h = case.tokens[rank], case.config.hidden_size
    hidden = torch.randn(1, t, h, generator=g)
    position_embeddings = model.model.rotary_emb(torch.arange(t).unsqueeze(0))
    return block, (hidden, position_embeddings), torch.randn(1, t, h, generator=g)


def compiled_block(case: DedupBlock) -> dict[str, Any]:
    """Rank body: the dedup EP block eagerly, then compiled (aot_eager) twice; graphs, breaks,
    and the collective ops of the compiled forward and backward graphs."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    block, inputs, cotangent = _block(case)
    eager = _step(block, block, inputs, cotangent)
    counter = GraphCounter("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=case.fullgraph)
    first = _step(block, compiled, inputs, cotangent)
    second = _step(block, compiled, inputs, cotangent)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    recorder = CollectiveRecorder()
    recorder.OPS = (*recorder.OPS, "ep_column_nonzero")
    compiled = torch.compile(block, backend=recorder.backend(), fullgraph=case.fullgraph)
    _step(block, compiled, inputs, cotangent)
    torch._dynamo.reset()
    return {
        "eager": eager,
        "compiled": first,
        "again": second,
        "graphs": graphs,
        "breaks": breaks,
        "ops": recorder.graphs,
        "missing": missing_gradients(block),
    }


# -------------------------------------------------------------------- a step's collectives


def measure_pairs(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> dict[str, Any]:
    """Rank body: one forward + backward (`counted_step`: every collective counted, the gradient
    sync without FSDP included), and the distinct (token, rank) pairs this ep rank sent each
    other ep rank in each MoE layer."""
    mesh = mesh_for(degrees)
    model = pipeline.apply(build_model(spec), mesh)
    batch = _batch(spec, pipeline, degrees)
    sent: dict[int, list[int]] = {}
    handles = []
    for layer, moe in enumerate(discover(model).moe_layers()):

        def hook(module: Any, args: Any, out: Any, layer: int = layer, e: int = moe.num_experts):
            if layer not in sent:  # the forward's routing, not a recomputation's
                sent[layer] = remote_pairs(out[0].reshape(-1, out[0].shape[-1]), e, degrees.ep)

        handles.append(moe.router.register_forward_hook(hook))
    log = CountingMode(_axes(mesh))
    counted_step(model, batch, mesh, pipeline, log, meter=False)
    for h in handles:
        h.remove()
    ep_group = mesh["ep"].get_group()
    return {
        "comm": log.comm(),
        "sent": [sent[i] for i in sorted(sent)],
        "ep_ranks": dist.get_process_group_ranks(ep_group),
        "ep_rank": dist.get_rank(ep_group),
    }


# ------------------------------------------------------------------------------- benchmark


def bench_dedup(spec: TrainSpec, degrees: MeshDegrees, *, steps: int) -> dict[str, Any]:
    """Rank body for `benchmarks/dedup.py`: one model per setting (dedup off, on), the same
    weights and rows. Per setting: one forward + backward's EP all-to-alls (calls and bytes
    sent to other ranks, data and int64 apart), the remote (token, rank) pairs this rank sent
    and received (summed over MoE layers), then `steps` forward + backward steps interleaved
    off / on, each the median seconds."""
    mesh = mesh_for(degrees)
    batch = _batch(spec, Pipeline(()), degrees)
    ep_group = mesh["ep"].get_group()
    me = dist.get_rank(ep_group)
    models = {d: ExpertParallel(dedup=d).apply(build_model(spec), mesh) for d in (False, True)}
    out: dict[str, Any] = {}
    for dedup, model in models.items():
        sent: list[list[int]] = []
        handles = [
            moe.router.register_forward_hook(
                lambda m, a, o, e=moe.num_experts, sent=sent: sent.append(
                    remote_pairs(o[0].reshape(-1, o[0].shape[-1]), e, degrees.ep)
                )
            )
            for moe in discover(model).moe_layers()
        ]
        log = _CollectiveLog(me, degrees.ep)
        with log:
            model(**batch).loss.backward()
        for h in handles:
            h.remove()
        received = torch.zeros(len(sent), degrees.ep, dtype=torch.int64)
        for layer, row in enumerate(sent):
            dist.all_to_all_single(received[layer], torch.tensor(row), group=ep_group)
        out[f"dedup={dedup}"] = {
            "calls": sum(log.calls.values()),
            "data": log.bytes["all_to_all_single[data]"],
            "int64": log.bytes["all_to_all_single[int64]"],
            "pairs": sum(sum(s) - s[me] for s in sent)
            + int(received.sum() - received[:, me].sum()),
        }
    for _ in range(steps):
        for dedup, model in models.items():
            model.zero_grad(set_to_none=True)
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            model(**batch).loss.backward()
            times = out[f"dedup={dedup}"].setdefault("times", [])
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return out


# ------------------------------------------------------------------------------- bf16 payload


def bf16_layer_step(case: MoECase, dedup: bool) -> dict[str, Any]:
    """Rank body: `moe_layer_step` on the layer cast to bf16 (payload, weights and mask in
    bf16), dedup or not; also the rows the per-copy dispatcher would hand the experts."""
    rank = dist.get_rank()
    mesh = mesh_for(MeshDegrees(dp_shard=case.degree, ep=case.degree))
    model = moe_case_model(case).to(torch.bfloat16)
    model = ExpertParallel(dedup=dedup).apply(model, mesh)
    moe = discover(model).moe_layers()[0].module
    hidden, cotangent = (x.to(torch.bfloat16) for x in moe_case_inputs(case, rank))
    hidden.requires_grad_(True)
    out, _ = moe(hidden)
    (out.float() * cotangent.float()).sum().backward()
    _, tokens, expert_ids = _dedup_dispatch(moe, hidden, mesh, case, rank)
    return {
        "out": out.detach().float(),
        "hidden_grad": hidden.grad.float(),
        "grads": {n: g.float() for n, g in gradients(moe).items()},
        "dispatched": (tokens.clone(), expert_ids.clone()),
    }
