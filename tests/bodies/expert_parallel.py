"""Rank bodies and shared case builders for the `ExpertParallel` tests and benchmark.

The builders (`moe_case_model`, `moe_case_inputs`) are used by both sides: the ranks build the
expert-parallel model from them, and the parent builds the single-process reference from them.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import MoEConfig, MoETransformer, init_weights_
from moetx.passes.expert_parallel.api import ExpertParallel
from moetx.passes.expert_parallel.dispatch import make_dispatcher
from moetx.structure.discovery import discover
from moetx.testing.parity import gradients
from moetx.testing.train import TrainSpec, build_model, global_batches, mesh_for

ROUTINGS = ("random", "remote", "cold_rank")
"""How `moe_case_model` sets the routers: as initialised; every rank's tokens go to the next
ep rank's experts (none stays local); or the last ep rank's experts get no token at all."""


@attrs.frozen(kw_only=True)
class MoECase:
    """One MoE-layer parity example: shapes, routing scenario and per-rank token counts.

    Attributes:
        num_experts: E, divisible by `degree`.
        top_k: k.
        hidden_size: H (at least `degree + 1`: the routing scenarios use one feature per rank
            plus a constant feature).
        tokens_per_rank: T_r for each rank (0 allowed).
        shared: Whether the MoE layer has shared experts.
        routing: One of `ROUTINGS`.
        dispatcher: `ExpertParallel.dispatcher`.
        degree: The ep degree (the world size in these examples).
        seed: Seeds the weights and the data.
        expert_hidden_size: I of one expert.
    """

    num_experts: int
    top_k: int
    hidden_size: int
    tokens_per_rank: tuple[int, ...]
    shared: bool
    routing: str
    dispatcher: str
    degree: int
    seed: int = 0
    expert_hidden_size: int = 4

    @property
    def config(self) -> MoEConfig:
        """A one-block model whose only block is MoE."""
        return MoEConfig(
            hidden_size=self.hidden_size,
            num_heads=1,
            num_kv_heads=1,
            num_layers=1,
            num_experts=self.num_experts,
            top_k=self.top_k,
            expert_hidden_size=self.expert_hidden_size,
            num_shared_experts=int(self.shared),
        )


def moe_case_model(case: MoECase) -> MoETransformer:
    """Build the case's model with its routing scenario applied to the router weights."""
    model = MoETransformer(case.config)
    init_weights_(model, case.seed)
    d, e, h = case.degree, case.num_experts, case.hidden_size
    owner = torch.arange(e) // (e // d)
    with torch.no_grad():
        for layer in discover(model).moe_layers():
            w = layer.router.get_parameter("weight")
            if case.routing == "remote":
                # A token of rank r carries feature r; experts of rank r+1 score high on it.
                w.mul_(0.1)
                w[torch.arange(e), (owner - 1) % d] = 8.0
            elif case.routing == "cold_rank":
                # Feature h-1 is a constant 1 on every token; the last rank's experts score low.
                w[owner == d - 1, h - 1] = -30.0
                w[owner != d - 1, h - 1] = 0.0
    return model


def moe_case_inputs(case: MoECase, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s MoE input `[1, T_r, H]` and the cotangent its loss is dotted with."""
    g = torch.Generator().manual_seed(1000 * case.seed + rank)
    t, h = case.tokens_per_rank[rank], case.hidden_size
    hidden = torch.randn(1, t, h, generator=g)
    if case.routing == "remote":
        hidden[..., : case.degree] *= 0.1
        hidden[..., rank] = 2.0
    elif case.routing == "cold_rank":
        hidden[..., h - 1] = 1.0
    return hidden, torch.randn(1, t, h, generator=g)


def moe_layer_step(case: MoECase) -> dict[str, Any]:
    """Rank body: apply EP, run the MoE layer on this rank's tokens, backward; return tensors."""
    rank = dist.get_rank()
    mesh = mesh_for(MeshDegrees(dp_shard=case.degree, ep=case.degree))
    model = ExpertParallel(dispatcher=case.dispatcher).apply(moe_case_model(case), mesh)
    moe = discover(model).moe_layers()[0].module
    hidden, cotangent = moe_case_inputs(case, rank)
    hidden.requires_grad_(True)
    out, _ = moe(hidden)
    (out * cotangent).sum().backward()
    return {
        "out": out.detach(),
        "hidden_grad": hidden.grad,
        "grads": gradients(moe),
        "missing": sorted(n for n, p in moe.named_parameters() if p.grad is None),
        "dispatched": _dispatch_only(case, mesh["ep"], moe, hidden.detach()),
    }


def _dispatch_only(
    case: MoECase, ep_mesh: DeviceMesh, moe: Any, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows and local expert ids `dispatch` hands this rank's experts (the contract test)."""
    flat = hidden.reshape(-1, case.hidden_size)
    with torch.no_grad():
        index, weights, _ = moe.gate(flat)
        dispatcher = make_dispatcher(case.dispatcher, ep_mesh, case.num_experts)
        tokens, expert_ids, _ = dispatcher.dispatch(flat, index, weights)
    return tokens.clone(), expert_ids.clone()


# ----------------------------------------------------------------------------- whole model


def model_step(
    spec: TrainSpec, degrees: MeshDegrees, dispatcher: str, *, meta: bool = False
) -> dict[str, Any]:
    """Rank body: apply EP to the whole model, one forward/backward on this rank's rows.

    Returns the loss, the logits, every full gradient, and the rank's ep-group index.
    """
    mesh = mesh_for(degrees)
    rank = dist.get_rank()
    ids, labels = global_batches(spec, degrees.world_size)[0]
    rows = slice(rank * spec.rows_per_rank, (rank + 1) * spec.rows_per_rank)
    ep = ExpertParallel(dispatcher=dispatcher)
    model: nn.Module
    if meta:
        with torch.device("meta"):
            model = MoETransformer(spec.config)
        model = ep.apply(model, mesh)
        model.to_empty(device="cpu")
        init_weights_(model, spec.seed)
    else:
        model = ep.apply(build_model(spec), mesh)
    out = model(ids[rows], labels=labels[rows])
    assert out.loss is not None
    out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "logits": out.logits.detach(),
        "grads": gradients(model),
        "ep_group": rank // degrees.ep,
        "sharded": sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor)),
    }


# ----------------------------------------------------------------------------- communication


_COLLECTIVES = (
    "all_to_all_single",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_reduce",
)


class _CollectiveLog(TorchDispatchMode):
    """Logs every functional all-to-all / all-gather / reduce-scatter with what it sends.

    Reads the split sizes actually passed to the ops (backward ops included, as long as the
    mode is active during backward). `sent_remote` counts bytes that leave the rank.
    """

    def __init__(self, group_rank: int, group_size: int) -> None:
        super().__init__()
        self.me, self.size = group_rank, group_size
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if func.namespace == "_c10d_functional" and name in _COLLECTIVES:
            x = args[0]
            row = x[0].numel() * x.element_size() if x.dim() and x.shape[0] else 0
            key = f"{name}[{'int64' if x.dtype == torch.int64 else 'data'}]"
            self.calls[key] += 1
            if name == "all_to_all_single":
                splits = args[2] if args[2] is not None else [x.shape[0] // self.size] * self.size
                self.bytes[key] += sum(s for j, s in enumerate(splits) if j != self.me) * row
            elif name == "all_gather_into_tensor":
                self.bytes[key] += (self.size - 1) * x.numel() * x.element_size()
            elif name == "reduce_scatter_tensor":
                self.bytes[key] += (self.size - 1) * x.numel() * x.element_size() // self.size
        return func(*args, **kwargs)


def comm_counts(spec: TrainSpec, degrees: MeshDegrees, dispatcher: str) -> dict[str, Any]:
    """Rank body: collective calls (and remote bytes) in one forward and one backward."""
    mesh = mesh_for(degrees)
    rank = dist.get_rank()
    ids, labels = global_batches(spec, degrees.world_size)[0]
    rows = slice(rank * spec.rows_per_rank, (rank + 1) * spec.rows_per_rank)
    model = ExpertParallel(dispatcher=dispatcher).apply(build_model(spec), mesh)
    ep_mesh = mesh["ep"]
    fwd = _CollectiveLog(ep_mesh.get_local_rank(), ep_mesh.size())
    bwd = _CollectiveLog(ep_mesh.get_local_rank(), ep_mesh.size())
    with fwd:
        out = model(ids[rows], labels=labels[rows])
    assert out.loss is not None
    with bwd:
        out.loss.backward()
    return {"forward": dict(fwd.calls), "backward": dict(bwd.calls)}


# ----------------------------------------------------------------------------- benchmark


def bench_layer(case: MoECase, *, warmup: int, steps: int) -> dict[str, Any]:
    """Rank body for `benchmarks/ep_dispatch.py`: bytes and time of one MoE layer step.

    Returns the remote bytes sent per step by kind (forward + backward), the minimum (copies
    routed to another rank's experts, there and back, forward and backward), and the median
    step time in seconds.
    """
    rank = dist.get_rank()
    mesh = mesh_for(MeshDegrees(dp_shard=case.degree, ep=case.degree))
    model = ExpertParallel(dispatcher=case.dispatcher).apply(moe_case_model(case), mesh)
    layer = discover(model).moe_layers()[0]
    hidden, cotangent = moe_case_inputs(case, rank)
    hidden.requires_grad_(True)

    def step() -> None:
        out, _ = layer.module(hidden)
        (out * cotangent).sum().backward()

    log = _CollectiveLog(rank, case.degree)
    with log:
        step()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        dist.barrier()
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    with torch.no_grad():
        index, _, _ = layer.router(hidden.reshape(-1, case.hidden_size))
    local = index // (case.num_experts // case.degree) == rank
    remote_copies = int((~local).sum())
    received = torch.tensor([0] * case.degree)
    owners = (index // (case.num_experts // case.degree)).reshape(-1)
    sent = torch.bincount(owners, minlength=case.degree)
    dist.all_to_all_single(received, sent)
    remote_received = int(received.sum() - received[rank])
    row = case.hidden_size * hidden.element_size()
    return {
        "bytes": dict(log.bytes),
        "calls": dict(log.calls),
        "minimum": 2 * (remote_copies + remote_received) * row,
        "time": sorted(times)[len(times) // 2],
    }
