"""The MoE hot path under `torch.compile`: one graph per block, no graph breaks, eager numerics."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

from moetx.models import TopKRouter
from moetx.models.ops import grouped_swiglu, swiglu_loop
from moetx.passes.expert_parallel.dispatch import DISPATCHERS
from moetx.testing import RankPool, compare, examples, nightly_param
from tests.bodies import compile_ops as bodies
from tests.bodies.compile_ops import BlockCase

TOL = {"atol": 1e-5, "rtol": 1e-4}


def _check(case: BlockCase, results: list[dict[str, Any]], *, graphs: int = 1) -> None:
    for rank, res in enumerate(results):
        assert res["breaks"] == 0, f"rank {rank}: {res['breaks']} graph breaks"
        assert res["graphs"] == graphs, f"rank {rank}: {res['graphs']} graphs"
        eager = res["eager"]
        for key in ("compiled", "again"):
            got = res[key]
            assert got["missing"] == eager["missing"] == [], f"rank {rank}: {got['missing']}"
            compare(
                {k: eager[k] for k in ("out", "aux", "hidden_grad", "grads")},
                {k: got[k] for k in ("out", "aux", "hidden_grad", "grads")},
                what=f"rank {rank} {key} vs eager ({case})",
                **TOL,
            )
        # The load counter counts each forward once, compiled or not.
        for name, load in eager["buffers"].items():
            assert torch.equal(res["compiled"]["buffers"][name], 2 * load), name
            assert torch.equal(res["again"]["buffers"][name], 3 * load), name


@pytest.mark.parametrize(
    ("dispatcher", "shared", "routing_bias"),
    [
        ("all_to_all", True, True),
        ("all_gather", False, False),
        nightly_param("all_to_all", False, False, why="ci runs the diagonal"),
        nightly_param("all_gather", True, True, why="ci runs the diagonal"),
    ],
)
def test_ep_block_compiles_whole_2_ranks(pool2, dispatcher: str, shared: bool, routing_bias: bool):
    """EP (both dispatchers) block, aot_eager, fullgraph: one graph, no break, eager numerics.

    ci runs each dispatcher once and each of (shared experts + routing bias, neither) once."""
    case = BlockCase(dispatcher=dispatcher, shared=shared, routing_bias=routing_bias, tokens=(6, 4))
    _check(case, pool2.run(bodies.eager_then_compiled, case))


def test_compiled_collectives_2_ranks(pool2):
    """Compiled, a layer issues the eager collectives, none recomputed in backward.

    all_to_all: forward the int64 count exchange + 2 uneven all-to-alls, backward 2; all_gather:
    forward the count, ids, tokens and weights gathers + 1 reduce-scatter, backward 2
    reduce-scatters + 1 gather (the uneven ones are `moetx::ep_*` ops, see
    `moetx.passes.expert_parallel.ops`). Also with `fullgraph=False`: still no graph break.
    """
    a2a = "moetx.ep_all_to_all.default"
    gather, scatter = "moetx.ep_gather_padded.default", "moetx.ep_scatter_padded.default"
    expected = {
        "all_to_all": {
            "forward": ["_c10d_functional.all_to_all_single.default", a2a, a2a],
            "backward": [a2a, a2a],
        },
        "all_gather": {
            "forward": [
                "_c10d_functional.all_gather_into_tensor.default",
                gather,
                gather,
                gather,
                scatter,
            ],
            "backward": [scatter, scatter, gather],
        },
    }
    for dispatcher in DISPATCHERS:
        case = BlockCase(dispatcher=dispatcher, routing_bias=True, fullgraph=False)
        for res in pool2.run(bodies.compiled_collectives, case):
            got = {kind: sorted(ops) for kind, ops in res.items()}
            want = {kind: sorted(ops) for kind, ops in expected[dispatcher].items()}
            assert got == want, dispatcher


@pytest.mark.parametrize("routing_bias", [False, True])
def test_block_compiles_whole_one_process(routing_bias: bool):
    """The same block without expert parallelism, in this process: one graph, no break."""
    case = BlockCase(dispatcher=None, routing_bias=routing_bias, tokens=(7,))
    _check(case, [bodies.eager_then_compiled(case)])


@pytest.mark.skipif(
    examples(1) < 5,
    reason="full/nightly profile (ci: test_ep_block_idle_rank_2_ranks, and 4-rank compiled "
    "pipelines in test_compile)",
)
def test_ep_block_compiles_whole_4_ranks(pool4):
    """ep=4 (one expert per rank, a rank without tokens): one graph, no break, eager numerics,
    for both dispatchers."""
    for dispatcher in DISPATCHERS:
        case = BlockCase(dispatcher=dispatcher, routing_bias=True, tokens=(5, 3, 0, 6))
        _check(case, pool4.run(bodies.eager_then_compiled, case))


def test_ep_block_compiles_inside_checkpoint_2_ranks(pool2):
    """The EP block under a checkpoint traced by dynamo (its higher-order op refuses side
    effects such as swapping module parameters): one graph, no break, eager numerics."""
    for dispatcher in DISPATCHERS:
        case = BlockCase(dispatcher=dispatcher, routing_bias=True, checkpoint=True)
        _check(case, pool2.run(bodies.eager_then_compiled, case))


@pytest.mark.skipif(examples(1) < 5, reason="full/nightly profile (slow: compiles twice)")
def test_ep_block_dynamic_shapes_2_ranks(pool2):
    """`dynamic=True` (symbolic token counts): still one graph, no break, eager numerics."""
    for dispatcher in DISPATCHERS:
        case = BlockCase(dispatcher=dispatcher, routing_bias=True, dynamic=True)
        _check(case, pool2.run(bodies.eager_then_compiled, case))


def test_ep_block_idle_rank_2_ranks(pool2):
    """A rank with no token (it still runs its experts' collectives) compiles and matches."""
    for dispatcher in DISPATCHERS:
        case = BlockCase(dispatcher=dispatcher, tokens=(5, 0))
        _check(case, pool2.run(bodies.eager_then_compiled, case))


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("HYPOTHESIS_PROFILE") not in ("full", "nightly"),
    reason="inductor's C++ builds take ~40-80 s on 2 cores: full and nightly profiles only",
)
def test_ep_block_inductor_2_ranks():
    """Inductor compiles the expert-parallel block too (all-to-all dispatcher, routing bias)."""
    case = BlockCase(dispatcher="all_to_all", routing_bias=True, backend="inductor")
    pool = RankPool(2, timeout=900.0)  # its own pool: the shared ones give a body 60 s
    try:
        _check(case, pool.run(bodies.eager_then_compiled, case))
    finally:
        pool.close()


# ------------------------------------------------------------------- the ops, in one process


@st.composite
def expert_inputs(draw: st.DrawFn) -> tuple[torch.Tensor, ...]:
    """T tokens routed to k of E experts (some experts idle, T = 0 allowed), grouped by expert."""
    e = draw(st.integers(1, 5))
    k = draw(st.integers(1, e))
    idle = draw(st.sets(st.integers(0, e - 1), max_size=e - k))
    t = draw(st.sampled_from([5, 0, 1, 3, 8]))
    h, i = draw(st.sampled_from([4, 8, 3])), draw(st.sampled_from([2, 5]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    busy = torch.tensor([x for x in range(e) if x not in idle])
    picks = [busy[torch.randperm(len(busy), generator=g)[:k]] for _ in range(t)]
    counts = torch.bincount(torch.cat([torch.zeros(0, dtype=torch.int64), *picks]), minlength=e)
    rows = int(counts.sum())
    x = torch.randn(rows, h, generator=g)
    gate_up, down = torch.randn(e, 2 * i, h, generator=g), torch.randn(e, h, i, generator=g)
    return x, counts, gate_up, down, torch.randn(rows, h, generator=g)


def _run(fn: Any, x: torch.Tensor, *args: Any) -> dict[str, torch.Tensor]:
    x, counts, gate_up, down, cotangent = (t.clone() for t in (x, *args))
    for t in (x, gate_up, down):
        t.requires_grad_(True)
    out = fn(x, counts, gate_up, down)
    (out * cotangent).sum().backward()
    assert x.grad is not None and gate_up.grad is not None and down.grad is not None
    return {"out": out.detach(), "x": x.grad, "gate_up": gate_up.grad, "down": down.grad}


@settings(max_examples=examples(60))
@given(inputs=expert_inputs())
def test_grouped_swiglu_matches_the_loop(inputs: tuple[torch.Tensor, ...]):
    """The compiled path's expert op: same output as the eager loop, gradients within fp32."""
    counts = inputs[1]
    loop = _run(lambda x, c, gu, d: swiglu_loop(x, c.tolist(), gu, d), *inputs)
    op = _run(grouped_swiglu, *inputs)
    assert torch.equal(op["out"], loop["out"])
    compare({k: loop[k] for k in loop if k != "out"}, {k: op[k] for k in op if k != "out"}, **TOL)
    idle = counts == 0
    assert not op["gate_up"][idle].any() and not op["down"][idle].any()


def test_ops_pass_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of the non-collective ops."""
    x = torch.randn(5, 4, requires_grad=True)
    gate_up, down = (
        torch.randn(3, 4, 4, requires_grad=True),
        torch.randn(3, 4, 2, requires_grad=True),
    )
    counts = torch.tensor([2, 0, 3])
    cases = [
        (torch.ops.moetx.grouped_swiglu_fwd.default, (x, counts, gate_up, down)),
        (torch.ops.moetx.ep_receive_layout.default, (torch.tensor([[1, 0], [2, 3]]),)),
        (torch.ops.moetx.ep_select_local.default, (torch.tensor([[1, 0], [2, 3], [-1, -1]]), 2, 2)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


@pytest.mark.parametrize("order", ["compile_inside_checkpoint", "checkpoint_inside_compile"])
def test_compiled_router_counts_once_under_checkpoint(order: str):
    """A compiled router and a (non-reentrant) checkpoint, either way round: the recomputation
    in backward does not count again."""
    torch._dynamo.reset()
    router = TopKRouter(8, 4, 2, routing_bias=True)
    hidden = torch.randn(6, 8, requires_grad=True)
    if order == "compile_inside_checkpoint":
        compiled = torch.compile(router, backend="aot_eager", fullgraph=True)
        _, weights, _ = checkpoint(compiled, hidden, use_reentrant=False)
    else:
        fn = torch.compile(
            lambda x: checkpoint(router, x, use_reentrant=False),
            backend="aot_eager",
            fullgraph=True,
        )
        _, weights, _ = fn(hidden)
    weights.sum().backward()
    assert router.expert_load is not None
    index = router(hidden.detach())[0]  # eager, counts once more
    expected = torch.bincount(index.reshape(-1), minlength=4)
    assert torch.equal(router.expert_load, 2 * expected)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("comm", "ep"),
    [
        ("allgather", False),
        ("p2p", True),
        # CP(all-gather) | EP compiled also runs in test_compile.py (4 ranks, with FSDP)
        nightly_param("allgather", True, why="ci runs the diagonal; test_compile runs it"),
        nightly_param("p2p", False, why="ci runs the diagonal"),
    ],
)
def test_cp_blocks_compile_whole_2_ranks(pool2, comm: str, ep: bool):
    """`ContextParallel` (+ `ExpertParallel`), every decoder block compiled with fullgraph: one
    graph per block (dense and MoE), no break; loss and every gradient equal eager. ci runs
    each comm once and with and without EP once."""
    for rank, res in enumerate(pool2.run(bodies.cp_model_compiled, comm, ep, True)):
        assert (res["graphs"], res["breaks"]) == (2, 0), (rank, res["reasons"])
        compare(res["eager"], res["compiled"], what=f"rank {rank} {comm} ep={ep}", **TOL)
