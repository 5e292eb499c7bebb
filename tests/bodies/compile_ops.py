"""Rank bodies for `tests/test_compile_ops.py`: one MoE decoder block, eager then compiled.

The block is the synthetic model's MoE `DecoderBlock` (attention, router, routed experts, optional
shared experts), with `ExpertParallel` applied when the world has more than one rank. Each body
runs the block eagerly, then under `torch.compile` on the same inputs, and returns both results
and the compiler's graph and graph-break counts, for the parent to compare.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import MoEConfig, MoETransformer, init_weights_
from moetx.passes.context_parallel.api import ContextParallel
from moetx.passes.expert_parallel.api import ExpertParallel
from moetx.testing.parity import gradients, missing_gradients
from moetx.testing.train import TrainSpec, build_model, global_batches, mesh_for


@attrs.frozen(kw_only=True)
class BlockCase:
    """One compiled-block example.

    Attributes:
        dispatcher: `ExpertParallel.dispatcher`, or None for no expert parallelism.
        shared: Shared experts in the MoE layer.
        routing_bias: Aux-loss-free balancing buffers (the router counts its load).
        tokens: Tokens per rank (`[1, T, H]` inputs; 0 allowed).
        backend: `torch.compile` backend (`"aot_eager"` or `"inductor"`).
        fullgraph: `torch.compile(fullgraph=...)`.
        dynamic: `torch.compile(dynamic=...)`.
        checkpoint: Compile the block wrapped in a non-reentrant `torch.utils.checkpoint`
            (dynamo's checkpoint higher-order op, which refuses side effects inside it).
        seed: Seeds the weights and the data.
    """

    dispatcher: str | None
    shared: bool = True
    routing_bias: bool = False
    tokens: tuple[int, ...] = (6, 6)
    backend: str = "aot_eager"
    fullgraph: bool = True
    dynamic: bool | None = None
    checkpoint: bool = False
    seed: int = 0

    @property
    def config(self) -> MoEConfig:
        """Two backbone layers, the second MoE; 4 experts, top-2."""
        return MoEConfig(
            hidden_size=16,
            num_layers=2,
            num_dense_layers=1,
            num_experts=4,
            top_k=2,
            num_shared_experts=int(self.shared),
            routing_bias=self.routing_bias,
        )


class GraphCounter:
    """A `torch.compile` backend that counts the graphs it is handed and delegates to another."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        compiler = torch._dynamo.lookup_backend(self.backend)
        return compiler(gm, example_inputs)  # type: ignore[no-any-return]


class CollectiveRecorder:
    """An aot_eager-like backend that records the collectives of each forward and backward graph.

    Partitions with `min_cut_rematerialization_partition` (what inductor uses, which may move
    cheap ops into the backward), so a collective recomputed in backward would show.
    """

    OPS = (
        "all_to_all_single",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "ep_all_to_all",
        "ep_gather_padded",
        "ep_scatter_padded",
    )

    def __init__(self) -> None:
        self.graphs: dict[str, list[str]] = {"forward": [], "backward": []}

    def _record(self, kind: str) -> Callable[..., Any]:
        def compiler(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            for node in gm.graph.nodes:
                name = str(node.target)
                if node.op == "call_function" and any(op in name for op in self.OPS):
                    self.graphs[kind].append(name)
            return make_boxed_func(gm)

        return compiler

    def backend(self) -> Any:
        """The `torch.compile` backend."""
        return aot_autograd(
            fw_compiler=self._record("forward"),
            bw_compiler=self._record("backward"),
            partition_fn=min_cut_rematerialization_partition,
        )


def compiled_collectives(case: BlockCase) -> dict[str, list[str]]:
    """Rank body: the collective ops in the compiled forward and backward graphs of the block."""
    torch._dynamo.reset()
    block, inputs, cotangent = block_and_inputs(case, dist.get_rank())
    recorder = CollectiveRecorder()
    compiled = torch.compile(block, backend=recorder.backend(), fullgraph=case.fullgraph)
    _step(block, compiled, inputs, cotangent)
    torch._dynamo.reset()
    return recorder.graphs


def block_and_inputs(case: BlockCase, rank: int) -> tuple[nn.Module, tuple[Any, ...], torch.Tensor]:
    """The (expert-parallel if `case.dispatcher`) MoE block, its inputs on `rank`, a cotangent."""
    model = MoETransformer(case.config)
    init_weights_(model, case.seed)
    if case.dispatcher is not None:
        degree = dist.get_world_size()
        mesh = mesh_for(MeshDegrees(dp_shard=degree, ep=degree))
        model = ExpertParallel(dispatcher=case.dispatcher).apply(model, mesh)
    block = model.model.layers[1]
    g = torch.Generator().manual_seed(1000 * case.seed + rank)
    t, h = case.tokens[rank], case.config.hidden_size
    hidden = torch.randn(1, t, h, generator=g)
    position_embeddings = model.model.rotary_emb(torch.arange(t).unsqueeze(0))
    return block, (hidden, position_embeddings), torch.randn(1, t, h, generator=g)


def _step(
    block: nn.Module, fn: Callable[..., Any], inputs: tuple[Any, ...], cotangent: torch.Tensor
) -> dict[str, Any]:
    block.zero_grad(set_to_none=True)
    hidden = inputs[0].clone().requires_grad_(True)
    out, aux = fn(hidden, inputs[1])
    ((out * cotangent).sum() + aux).backward()
    buffers = {n: b.clone() for n, b in block.named_buffers() if "expert_load" in n}
    return {
        "out": out.detach(),
        "aux": aux.detach(),
        "hidden_grad": hidden.grad,
        "grads": gradients(block),
        "missing": missing_gradients(block),
        "buffers": buffers,
    }


def eager_then_compiled(case: BlockCase) -> dict[str, Any]:
    """Rank body: the block eagerly, then compiled (twice: the second call reuses the graph)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    block, inputs, cotangent = block_and_inputs(case, rank)
    eager = _step(block, block, inputs, cotangent)
    counter = GraphCounter(case.backend)
    compiled = torch.compile(block, backend=counter, fullgraph=case.fullgraph, dynamic=case.dynamic)
    first = _step(block, compiled, inputs, cotangent)
    second = _step(block, compiled, inputs, cotangent)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    # Unique graphs, not backend calls: with `dynamic=True` dynamo restarts its analysis once
    # (it specializes the RMSNorm's Python-float eps) and hands the backend the graph twice.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return {
        "eager": eager,
        "compiled": first,
        "again": second,
        "graphs": graphs,
        "backend_calls": counter.graphs,
        "breaks": breaks,
    }


def cp_model_compiled(comm: str, ep: bool, fullgraph: bool) -> dict[str, Any]:
    """Rank body: `ContextParallel(comm)` (and `ExpertParallel`) on the world, eager then with
    every decoder block compiled (aot_eager); loss, every gradient, graphs and graph breaks."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    degree = dist.get_world_size()
    mesh = mesh_for(MeshDegrees(cp=degree, ep=degree if ep else 1))
    spec = TrainSpec(config=BlockCase(dispatcher=None).config, rows_per_rank=2, seq_len=8, steps=1)
    cp = ContextParallel(comm=comm)
    model = (
        (cp | ExpertParallel()).apply(build_model(spec), mesh)
        if ep
        else cp.apply(build_model(spec), mesh)
    )
    ids, labels = global_batches(spec, 1)[0]
    local_ids, local_labels, positions = cp.shard_sequence(mesh, ids, labels)

    def step() -> dict[str, Any]:
        model.zero_grad(set_to_none=True)
        out = model(local_ids, labels=local_labels, position_ids=positions)
        out.loss.backward()
        return {"loss": out.loss.detach(), "grads": gradients(model)}

    eager = step()
    counter = GraphCounter("aot_eager")
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = torch.compile(layer, backend=counter, fullgraph=fullgraph)
    compiled = step()
    reasons = dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()
    return {
        "eager": eager,
        "compiled": compiled,
        "graphs": counter.graphs,
        "breaks": sum(reasons.values()),
        "reasons": reasons,
    }
