"""`ExpertParallel(dedup=True)`: one process's numerics, the bytes it sends, compiled, predicted."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moetx import FSDP, ExpertParallel, MeshDegrees, Pipeline
from moetx.core.errors import PassPreconditionError
from moetx.core.record import applied_passes
from moetx.mesh.parallel_mesh import ParallelMesh
from moetx.models import MoEConfig
from moetx.passes.expert_parallel.dedup import mask_columns
from moetx.planning import predict
from moetx.structure.discovery import discover
from moetx.testing import RankPool, compare, examples, fake_world, nightly_param
from moetx.testing.train import (
    TrainSpec,
    assert_matches_reference,
    assert_training_parity,
    build_model,
    mean_losses,
    rank_train,
    reference,
)
from tests.bodies import dedup as bodies
from tests.bodies.autoplan import assert_counted_as_predicted, drawn_routing
from tests.bodies.compile import compiled_train
from tests.bodies.dedup import DedupBlock
from tests.bodies.expert_parallel import MoECase
from tests.test_compile_ops import _check as check_compiled
from tests.test_expert_parallel import _check_moe_layer, moe_cases

TOL = {"atol": 1e-5, "rtol": 1e-4}


# ------------------------------------------------------------------------------- the option


def test_option_value_and_parse():
    """`dedup` is a plain bool option: repr, equality, parse; off by default."""
    assert repr(ExpertParallel(dedup=True)) == "ExpertParallel(dedup=True)"
    assert ExpertParallel(dedup=False) == ExpertParallel()
    assert Pipeline.parse("ep(dedup=True)|fsdp") == ExpertParallel(dedup=True) | FSDP()


def test_dedup_needs_the_all_to_all_dispatcher():
    """With the all-gather dispatcher: a pinned `PassPreconditionError`, model untouched."""
    with fake_world(2):
        model = build_model(TrainSpec(config=MoEConfig(num_experts=4)))
        before = {n: id(p) for n, p in model.named_parameters()}
        with pytest.raises(
            PassPreconditionError,
            match=(
                r"^`ExpertParallel\(dispatcher='all_gather', dedup=True\)`: `dedup` sends each "
                r"token once per rank with the all-to-all dispatcher; the 'all_gather' dispatcher "
                r"already sends each token once to every rank\.\n"
                r"  fix: drop `dedup`, or use dispatcher='all_to_all'\.$"
            ),
        ):
            ExpertParallel(dispatcher="all_gather", dedup=True).apply(
                model, ParallelMesh.build(ep=2)
            )
        assert {n: id(p) for n, p in model.named_parameters()} == before
        assert applied_passes(model) == ()


def test_mask_columns_are_exact_in_the_payload_dtype():
    """A mask column holds as many local experts as the dtype has significand bits (one bit
    more would round)."""
    assert mask_columns(4, torch.float32) == 1 and mask_columns(24, torch.float32) == 1
    assert mask_columns(25, torch.float32) == 2
    assert mask_columns(8, torch.bfloat16) == 1 and mask_columns(9, torch.bfloat16) == 2
    assert mask_columns(11, torch.float16) == 1 and mask_columns(12, torch.float16) == 2
    for dtype, bits in ((torch.float32, 24), (torch.bfloat16, 8), (torch.float16, 11)):
        top = torch.tensor(2**bits - 1, dtype=torch.int64)
        assert int(top.to(dtype).to(torch.int64)) == 2**bits - 1, dtype
        over = torch.tensor(2 ** (bits + 1) - 1, dtype=torch.int64)
        assert int(over.to(dtype).to(torch.int64)) != 2 ** (bits + 1) - 1, dtype


# ------------------------------------------------------------ one MoE layer vs one process


def _check_layer(case: MoECase, results: list[dict[str, Any]]) -> None:
    """`_check_moe_layer` (outputs, input and every parameter gradient, the dispatched rows),
    then the bytes: exactly the distinct remote (token, rank) pairs, hidden + weight + mask
    columns on dispatch, hidden on combine, forward and backward (per copy, as the per-copy
    dispatcher, when top-1 or one expert per rank); 3 + 2 collectives."""
    _check_moe_layer(case, results)
    local = case.num_experts // case.degree
    per_copy = min(case.top_k, local) == 1  # pairs are copies: no weight or mask columns
    extra = 0 if per_copy else local + mask_columns(local, torch.float32)
    counts = local if per_copy else 1
    h = case.hidden_size
    for rank, res in enumerate(results):
        pairs = res["pairs_sent"] + res["pairs_received"]
        assert res["bytes"]["all_to_all_single[data]"] == pairs * (2 * h + extra) * 4, rank
        assert res["calls"] == {"all_to_all_single[int64]": 1, "all_to_all_single[data]": 4}
        assert res["bytes"]["all_to_all_single[int64]"] == (case.degree - 1) * counts * 8


@settings(max_examples=examples(20), deadline=None)
@given(case=moe_cases(degree=2).map(lambda c: attrs.evolve(c, dispatcher="all_to_all")))
def test_moe_layer_matches_one_process_2_ranks(pool2: RankPool, case: MoECase):
    """ep=2: top-1..3, idle and uneven ranks, every routing scenario; exact bytes."""
    _check_layer(case, pool2.run(bodies.moe_layer_step, case))


@settings(max_examples=examples(8), deadline=None)
@given(case=moe_cases(degree=4).map(lambda c: attrs.evolve(c, dispatcher="all_to_all")))
def test_moe_layer_matches_one_process_4_ranks(pool4: RankPool, case: MoECase):
    """ep=4: the same checks."""
    _check_layer(case, pool4.run(bodies.moe_layer_step, case))


def test_edge_cases_2_ranks(pool2: RankPool):
    """No tokens anywhere; every token remote; a rank receiving, or sending, nothing; top-1."""
    cases = [("random", (0, 0), 2), ("remote", (5, 3), 2), ("cold_rank", (0, 6), 2)]
    cases += [("random", (5, 3), 1), ("random", (7, 7), 4)]
    for routing, tokens, k in cases:
        case = MoECase(
            num_experts=4,
            top_k=k,
            hidden_size=8,
            tokens_per_rank=tokens,
            shared=True,
            routing=routing,
            dispatcher="all_to_all",
            degree=2,
        )
        _check_layer(case, pool2.run(bodies.moe_layer_step, case))


def test_fewer_bytes_than_per_copy_when_experts_share_a_rank(pool2: RankPool):
    """top-4 of 4 experts on 2 ranks: each token reaches both ranks once instead of 4 times."""
    case = MoECase(
        num_experts=4, top_k=4, hidden_size=16, tokens_per_rank=(6, 5), shared=False,
        routing="random", dispatcher="all_to_all", degree=2,
    )  # fmt: skip
    on = pool2.run(bodies.moe_layer_step, case, True)
    off = pool2.run(bodies.moe_layer_step, case, False)
    for a, b in zip(on, off, strict=True):
        assert a["copies_sent"] == 2 * a["pairs_sent"]
        assert a["bytes"]["all_to_all_single[data]"] < b["bytes"]["all_to_all_single[data]"]
        assert a["calls"] == b["calls"] | {"all_to_all_single[int64]": 1}
        compare({"out": b["out"]}, {"out": a["out"]}, what="dedup vs per-copy", **TOL)


# ---------------------------------------------------------------- whole pipelines vs one process

CONFIG = MoEConfig(
    hidden_size=16, num_layers=2, num_dense_layers=0, num_experts=8, top_k=3,
    num_shared_experts=1, num_mtp_layers=1, aux_loss_coef=0.01, routing_bias=True,
)  # fmt: skip
SPEC = TrainSpec(config=CONFIG, steps=2, rows_per_rank=2, seq_len=6)


@pytest.mark.parametrize(
    ("world", "degrees", "tail"),
    [
        (2, MeshDegrees(dp_shard=2, ep=2), "fsdp"),
        (2, MeshDegrees(dp_shard=2, ep=2), "ac|fsdp"),
        (4, MeshDegrees(dp_shard=4, ep=4), "ac(mode='full')|fsdp"),
        (4, MeshDegrees(dp_shard=4, ep=2), "ac|fsdp"),
        (4, MeshDegrees(dp_shard=2, dp_replicate=2, ep=2), "ac(mode='selective')|fsdp"),
    ],
)
def test_training_matches_one_process(request, world: int, degrees: MeshDegrees, tail: str):
    """2 AdamW steps, routing bias and aux loss, an MTP head: the loss and every gathered
    gradient at each step, and the final parameters, equal one process (ep 2, ep 4, ep 2 in
    a 4-rank mesh with ep_shard, HSDP), with activation checkpointing and FSDP."""
    pool = request.getfixturevalue(f"pool{world}")
    pipeline = Pipeline.parse(f"ep(dedup=True)|{tail}")
    assert_training_parity(pool.run(rank_train, SPEC, pipeline, degrees), SPEC, degrees)


def test_top_1_training_matches_one_process(pool2: RankPool):
    """top-1 (dispatched per copy: no token has two experts on one rank): one process's numbers."""
    spec = attrs.evolve(SPEC, config=attrs.evolve(CONFIG, top_k=1))
    degrees = MeshDegrees(dp_shard=2, ep=2)
    pipeline = Pipeline.parse("ep(dedup=True)|ac|fsdp")
    assert_training_parity(pool2.run(rank_train, spec, pipeline, degrees), spec, degrees)


# --------------------------------------------------------------------------------- compiled


@pytest.mark.parametrize(
    "case",
    [
        DedupBlock(),
        DedupBlock(tokens=(0, 5), top_k=1),
        nightly_param(DedupBlock(num_experts=8, top_k=3), why="ci: top-2 and top-1"),
    ],
    ids=["top2", "idle-top1", "top3"],
)
def test_block_compiles_whole_2_ranks(pool2: RankPool, case: DedupBlock):
    """aot_eager, fullgraph: one graph, no break, eager numerics; the same collectives as the
    per-copy dispatcher (forward the count exchange + 2 `moetx::ep_all_to_all`, backward 2),
    and the two pair / copy listings as `moetx::ep_column_nonzero` (none with top-1)."""
    results = pool2.run(bodies.compiled_block, case)
    check_compiled(case, results)  # type: ignore[arg-type]
    a2a = "moetx.ep_all_to_all.default"
    dedup = min(case.top_k, case.num_experts // 2) > 1  # top-1: dispatched per copy
    for res in results:
        got = {k: sorted(v) for k, v in res["ops"].items()}
        assert got == {
            "forward": sorted(
                ["_c10d_functional.all_to_all_single.default", a2a, a2a]
                + ["moetx.ep_column_nonzero.default"] * 2 * dedup
            ),
            "backward": [a2a, a2a],
        }


@pytest.mark.parametrize("mode", ["router", "full"])
def test_compiled_pipeline_trains_like_one_process(pool2: RankPool, mode: str):
    """`ep(dedup=True) | ac | compile(fullgraph) | fsdp` on 2 ranks (routing bias, aux loss,
    MTP): every gradient each step equals one process, one graph and no break per block."""
    pipeline = Pipeline.parse(
        f"ep(dedup=True)|ac(mode={mode!r})|compile(backend='aot_eager', fullgraph=True)|fsdp"
    )
    degrees = MeshDegrees(dp_shard=2, ep=2)
    results = pool2.run(compiled_train, SPEC, pipeline, degrees)
    assert_matches_reference(results, reference(SPEC, 2))
    blocks = [b.fqn for b in discover(build_model(SPEC)).blocks]
    for r in results:
        assert r["graphs"] == {f: (1, 0) for f in blocks}, r["reasons"]


# --------------------------------------------------------------------------------- planner


PLAN_SPEC = attrs.evolve(
    SPEC, config=attrs.evolve(CONFIG, routing_bias=False, aux_loss_coef=0.0, num_mtp_layers=0)
)


@st.composite
def plan_cases(draw: st.DrawFn) -> tuple[TrainSpec, Pipeline, MeshDegrees]:
    """top-3, 2 or 1 of 8 experts, ep 2 or 4 on 4 ranks, any checkpointing mode, FSDP or not."""
    k = draw(st.sampled_from([3, 2, 1]))
    spec = attrs.evolve(PLAN_SPEC, config=attrs.evolve(PLAN_SPEC.config, top_k=k))
    degrees = MeshDegrees(dp_shard=4, ep=draw(st.sampled_from([2, 4])))
    tail = draw(st.sampled_from(["", "|ac", "|ac(mode='full')", "|ac(mode='selective')"]))
    tail += draw(st.sampled_from(["", "|fsdp"]))
    return spec, Pipeline.parse(f"ep(dedup=True){tail}"), degrees


@settings(max_examples=examples(6), deadline=None)
@given(case=plan_cases())
def test_predicted_bytes_equal_counted_bytes(pool4: RankPool, case):
    """For the (token, rank) pairs the routing drew, every collective the planner predicts
    equals what each of 4 gloo ranks counted: calls and bytes, per kind and axis."""
    spec, pipeline, degrees = case
    results = pool4.run(bodies.measure_pairs, spec, pipeline, degrees)
    for rank, got in enumerate(results):
        p = predict(
            spec.config, degrees, pipeline, seq=spec.seq_len, micro_batch=spec.rows_per_rank,
            routing=drawn_routing(results, rank), ep_rank=got["ep_rank"],
        )  # fmt: skip
        assert_counted_as_predicted(got["comm"], p.comm, rank)


def test_uniform_prediction_dedups_and_worst_case_does_not():
    """Uniform top-2 of 8 experts on ep 2, 256 tokens per rank: a token reaches
    2·(1 − C(6,2)/C(8,2)) = 1.571 ranks on average, so 201 remote pairs each way per layer
    (hidden 64 + 4 weight + 1 mask columns on dispatch, 64 on combine, fp32), against 256
    remote copies per copy; the worst case (no two experts of a token on one rank) sends more
    than per copy (the weight and mask columns)."""
    config = attrs.evolve(PLAN_SPEC.config, top_k=2, hidden_size=64)
    degrees = MeshDegrees(dp_shard=2, ep=2)
    on = predict(config, degrees, ExpertParallel(dedup=True), seq=64, micro_batch=4)
    off = predict(config, degrees, ExpertParallel(), seq=64, micro_batch=4)
    (a,) = [t for t in on.comm if t.kind == "ep_all_to_all"]
    (b,) = [t for t in off.comm if t.kind == "ep_all_to_all"]
    layers = 2
    assert a.calls == b.calls == 5 * layers
    assert a.bytes == layers * (2 * 201 * (276 + 256) + 8)
    assert b.bytes == layers * (4 * 256 * 256 + 4 * 8)
    assert a.worst_bytes == layers * (256 * 276 + 256 * 256 + 256 * 256 + 256 * 276 + 8)
    assert a.bytes < b.bytes < a.worst_bytes


# ------------------------------------------------------------------------------- bf16 payload


@pytest.mark.parametrize(("experts", "k"), [(8, 2), (20, 10)], ids=["1-mask-column", "2-columns"])
def test_bf16_payload_rounds_as_the_per_copy_dispatcher(pool2: RankPool, experts: int, k: int):
    """In bf16 the mask stays exact (20 experts on 2 ranks: 10 local experts, two 8-bit mask
    columns; the experts get exactly the rows and ids of the per-copy dispatcher) and the
    weights round as the per-copy dispatcher rounds them: outputs and every gradient agree
    with it to bf16 precision, and each is as far from the fp32 layer as the other."""
    case = MoECase(
        num_experts=experts, top_k=k, hidden_size=16, tokens_per_rank=(7, 5), shared=True,
        routing="random", dispatcher="all_to_all", degree=2,
    )  # fmt: skip
    on = pool2.run(bodies.bf16_layer_step, case, True)
    off = pool2.run(bodies.bf16_layer_step, case, False)
    exact = pool2.run(bodies.moe_layer_step, case, False)
    for rank, (a, b, ref) in enumerate(zip(on, off, exact, strict=True)):
        tokens, ids = a["dispatched"]
        assert torch.equal(ids, ref["dispatched"][1]), rank
        assert torch.equal(tokens, ref["dispatched"][0].to(torch.bfloat16)), rank
        compare(
            {"out": b["out"], "hidden_grad": b["hidden_grad"], **b["grads"]},
            {"out": a["out"], "hidden_grad": a["hidden_grad"], **a["grads"]},
            what=f"rank {rank} bf16 dedup vs per copy", atol=3e-2, rtol=3e-2,
        )  # fmt: skip
        for name, want in {"out": ref["out"], **ref["grads"]}.items():
            got_on = a["out"] if name == "out" else a["grads"][name]
            got_off = b["out"] if name == "out" else b["grads"][name]
            err_on, err_off = (got_on - want).abs().max(), (got_off - want).abs().max()
            assert err_on <= 2 * err_off + 1e-2 * want.abs().max(), (rank, name, err_on, err_off)


def test_bf16_fsdp_step_matches_per_copy(pool2: RankPool):
    """FSDP in bf16 (bf16 hidden states, so a bf16 payload; fp32 router unit and gradient
    reduction), one step: the loss and every gradient equal the per-copy dispatcher's to bf16
    precision (measured: max abs difference 4.9e-4 on gradients up to 0.24). One step only:
    AdamW moves each parameter by about lr·sign(g) at first, so a rounding-level change of a
    near-zero gradient flips that step and the next step's gradients differ by more."""
    spec = attrs.evolve(SPEC, param_dtype="bfloat16", steps=1)
    degrees = MeshDegrees(dp_shard=2, ep=2)
    tail = "|ac|fsdp(param_dtype='bfloat16', reduce_dtype='float32')"
    off = pool2.run(rank_train, spec, Pipeline.parse(f"ep{tail}"), degrees)
    on = pool2.run(rank_train, spec, Pipeline.parse(f"ep(dedup=True){tail}"), degrees)
    ((a,), (b,)) = mean_losses(on), mean_losses(off)
    compare({"loss": b}, {"loss": a}, atol=1e-3, rtol=1e-2, what="loss")
    for rank, (a, b) in enumerate(zip(on, off, strict=True)):
        compare(b["grads"][0], a["grads"][0], atol=2e-3, rtol=2e-2, what=f"rank {rank} grads")
