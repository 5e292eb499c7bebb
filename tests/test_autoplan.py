"""`autoplan` and `predict`: predictions proven on real gloo ranks, the top candidate trains like one
process, a rejected one is over budget on the meter, and DeepSeek-V3 plans in seconds."""

from __future__ import annotations

import gc
import itertools
import time

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moetx
from moetx import (
    FSDP,
    ActivationCheckpoint,
    ContextParallel,
    CostModel,
    ExpertParallel,
    MeshDegrees,
    NoFittingPlanError,
    ParallelMesh,
    Pipeline,
    PlanningError,
    TensorParallel,
)
from moetx.__main__ import main
from moetx.core.algebra import Pass
from moetx.core.order import Placement
from moetx.models import MoEConfig, MoETransformer
from moetx.planning import LiveActivationMeter, Traffic, autoplan, plan, predict
from moetx.planning.autoplan import PASSES
from moetx.planning.predict_fsdp import fsdp_units
from moetx.planning.predict_state import ModelShapes, state_bytes
from moetx.testing import RankPool, examples, fake_world, nightly_param
from moetx.testing.hf import HFSpec
from moetx.testing.hf import build_model as hf_build_model
from moetx.testing.strategies import mesh_degrees
from moetx.testing.train import TrainSpec, assert_matches_reference, build_model, train
from tests.bodies import training_loop
from tests.bodies.autoplan import (
    assert_counted_as_predicted,
    drawn_routing,
    hf_held_bytes,
    measure_step,
)
from tests.bodies.plan import gathered_after_forward, held_bytes

# Odd sizes (vocab 67, hidden 12, widths 6 / 10) split unevenly over 2 and 4 ranks. Routing bias
# and the aux loss (and their collectives) are drawn by the tests that count collectives.
CONFIG = MoEConfig(
    vocab_size=67, hidden_size=12, num_heads=2, num_kv_heads=1, num_layers=3, num_dense_layers=1,
    num_experts=4, top_k=2, expert_hidden_size=6, num_shared_experts=1, dense_hidden_size=10,
)  # fmt: skip
SPEC = TrainSpec(config=CONFIG, steps=1, rows_per_rank=2, seq_len=8)
MODES = ("none", "full", "router", "selective", "full/2")


def _ac(mode: str) -> list[ActivationCheckpoint]:
    if mode == "none":
        return []
    name, _, every = mode.partition("/")
    return [ActivationCheckpoint(mode=name, every=int(every or 1))]


@st.composite
def cases(draw: st.DrawFn, *, world_size: int) -> tuple[Pipeline, MeshDegrees, str]:
    """A legal mesh for `world_size` ranks and a pipeline for it (cp and ep when their degree is
    above 1, ep sometimes at degree 1), with any checkpointing mode and FSDP or not."""
    degrees = draw(mesh_degrees(world_size=world_size))
    mode = draw(st.sampled_from(MODES))
    passes = [ContextParallel()] * (degrees.cp > 1)
    if degrees.ep > 1 or draw(st.booleans()):
        # the all-gather dispatcher where its all-gathers cannot be taken for CP's in the count
        gather = degrees.cp == 1 and draw(st.booleans())
        passes.append(ExpertParallel(dispatcher="all_gather" if gather else "all_to_all"))
    passes += _ac(mode)
    if draw(st.booleans()):
        passes.append(draw(fsdps()))
    return Pipeline(tuple(passes)), degrees, mode


@st.composite
def fsdps(draw: st.DrawFn) -> FSDP:
    """FSDP in fp32 or mixed (bf16 all-gathers, fp32 reduce-scatters, an fp32 router unit),
    resharding every unit or by the "auto" policy, with the small units merged or not (4096 bytes:
    the blocks of `CONFIG` in pairs in fp32, all in one unit in bf16; 1 MiB: all in one)."""
    mixed = draw(st.booleans())
    return FSDP(
        param_dtype="bfloat16" if mixed else None,
        reduce_dtype="float32" if mixed else None,
        reshard_after_forward=draw(st.sampled_from([True, "auto"])),
        min_unit_bytes=draw(st.sampled_from([0, 4096, 1 << 20])),
    )


def _spec(degrees: MeshDegrees, **config: float) -> TrainSpec:
    mtp = config.pop("num_mtp_layers", 0) * (degrees.cp == 1)  # CP refuses an MTP head
    return attrs.evolve(SPEC, config=attrs.evolve(CONFIG, num_mtp_layers=mtp, **config))


# --------------------------------------------------------------------------- parameter state


@settings(max_examples=examples(12), deadline=None)
@given(
    case=st.integers(2, 3).flatmap(lambda p: cases(world_size=2**p)),
    experts=st.sampled_from([8, 16]),  # divisible by every ep degree drawn (up to 8)
    mtp=st.integers(0, 1),
    frozen=st.booleans(),
)
def test_state_bytes_equal_the_applied_plan(case, experts, mtp, frozen):
    """Parameter, gradient and AdamW bytes from shapes alone equal `plan` (pipeline applied on
    meta; `test_plan` checks it against real ranks) on the largest rank, exactly."""
    pipeline, degrees, _ = case
    spec = _spec(degrees, num_experts=experts, num_mtp_layers=mtp)
    model = build_model(spec, meta=True)
    if frozen:
        model.get_submodule("model.embed_tokens").weight.requires_grad_(False)
    got = state_bytes(ModelShapes.of(model), degrees, pipeline)
    p = plan(pipeline, model, degrees)
    assert got == p.ranks[0] and got.total == p.max_rank_bytes


@pytest.mark.parametrize(
    ("fsdp", "degrees"),
    [
        (FSDP(reshard_after_forward=False), MeshDegrees(dp_shard=2, ep=2)),
        (FSDP(reshard_after_forward=False, param_dtype="bfloat16"), MeshDegrees(dp_shard=4, ep=2)),
        (FSDP(reshard_after_forward=2), MeshDegrees(dp_shard=4, ep=2)),  # experts: 2 ranks
    ],
    ids=["false", "false-bf16", "int-2"],
)
def test_kept_gathered_parameters_equal_the_plan(fsdp: FSDP, degrees: MeshDegrees):
    """What `reshard_after_forward=False | int` keeps gathered after forward is in the predicted
    memory, equal to `Plan.resident_after_forward` (checked against real ranks in test_plan)."""
    config = MoEConfig(num_experts=4, num_shared_experts=1)
    pipeline = ExpertParallel() | fsdp
    got = predict(config, degrees, pipeline, seq=8)
    assert got.fsdp_resident == plan(pipeline, config, degrees).resident_after_forward > 0


@settings(max_examples=examples(6), deadline=None)
@given(
    degrees=mesh_degrees(world_size=4),
    fsdp=fsdps(),
    frozen=st.sampled_from([(), ("model.layers.1", "lm_head"), ("model.embed_tokens",)]),
)
def test_auto_policy_keeps_what_real_ranks_keep(pool4: RankPool, degrees, fsdp, frozen):
    """`reshard_after_forward="auto"` (and `min_unit_bytes`): the gathered bytes `predict` says
    a rank keeps after forward equal `plan`'s and the all-gather buffers FSDP2 holds on 4 gloo
    ranks, exactly; frozen parameters shrink the budget so that some units reshard."""
    spec = attrs.evolve(_spec(degrees, num_experts=8), frozen=frozen)
    fsdp = attrs.evolve(fsdp, reshard_after_forward="auto")
    pipeline = Pipeline((*[ExpertParallel()] * (degrees.ep > 1), fsdp))
    model = build_model(spec, meta=True)
    got = predict(model, degrees, pipeline, seq=spec.seq_len).fsdp_resident
    assert got == plan(pipeline, model, degrees).resident_after_forward
    assert pool4.run(gathered_after_forward, spec, pipeline, degrees) == [got] * 4


def test_auto_policy_units_and_budget_follow_the_pass():
    """The units "auto" keeps and those `min_unit_bytes` joins or groups are the pass's own
    (`FSDP.facts`), on a mesh where only some fit."""
    spec = attrs.evolve(SPEC, frozen=("model.layers.1", "lm_head"))
    degrees = MeshDegrees(dp_shard=4, ep=2)
    for fsdp in (
        FSDP(reshard_after_forward="auto"),
        FSDP(reshard_after_forward="auto", min_unit_bytes=1 << 20),
        FSDP(reshard_after_forward="auto", min_unit_bytes=4096),  # blocks in pairs
    ):
        pipeline = ExpertParallel() | fsdp
        model = build_model(spec, meta=True)
        units = fsdp_units(ModelShapes.of(model), degrees, pipeline)
        p = plan(pipeline, model, degrees)
        kept = sum(u.count for u in units if u.kept)
        total = sum(u.count for u in units)
        assert f"keeps {kept} of {total} FSDP units" in str(p), str(p)
        assert 0 < kept < total


# --------------------------------------------------------------------------------- activations


def _measured_activations(config: MoEConfig, mode: str, rows: int, seq: int) -> int:
    torch.manual_seed(0)
    model = MoETransformer(config)
    if mode != "none":
        with fake_world(1):
            model = Pipeline(tuple(_ac(mode))).apply(model, ParallelMesh.build(device_type="cpu"))
    ids = torch.randint(0, config.vocab_size, (rows, seq))
    labels = torch.randint(0, config.vocab_size, (rows, seq))
    gc.freeze()  # the meter collects garbage: scan only what this forward made
    try:
        with LiveActivationMeter(exclude=[model, ids, labels]) as live:
            out = model(ids, labels=labels)
        return live.live_bytes(exclude=[out.logits, out.loss])
    finally:
        gc.unfreeze()


@settings(max_examples=examples(8), deadline=None)
@given(
    mode=st.sampled_from(MODES),
    layers=st.integers(2, 4),  # full/2 needs two blocks
    dense=st.integers(0, 1),
    mtp=st.integers(0, 1),
    rows=st.integers(1, 3),
    seq=st.sampled_from([8, 16, 24]),
    shared=st.integers(0, 1),
    bias=st.booleans(),
)
def test_activation_bytes_match_the_meter_on_a_real_forward(
    mode, layers, dense, mtp, rows, seq, shared, bias
):
    """The meta trace (one block per kind, summed over the real depth) is within 5% of
    `LiveActivationMeter` on a real CPU forward, for every checkpointing mode."""
    config = attrs.evolve(
        CONFIG, num_layers=layers + dense, num_dense_layers=dense, num_mtp_layers=mtp,
        num_shared_experts=shared, routing_bias=bias, aux_loss_coef=0.01 * bias,
    )  # fmt: skip
    pipeline = Pipeline(tuple(_ac(mode)))
    predicted = predict(config, MeshDegrees(), pipeline, seq=seq, micro_batch=rows).activations
    real = _measured_activations(config, mode, rows, seq)
    print(f"activations {mode} predicted {predicted} measured {real}: {predicted / real - 1:+.4%}")
    assert abs(predicted - real) <= 0.05 * real, (predicted, real)


# ----------------------------------------------------------------- communication on real ranks


def test_the_counted_versus_predicted_check_fails_on_any_difference():
    """`assert_counted_as_predicted` (used by every real-rank collective test) passes only when
    the counts equal the predicted ones, and lets a kind the prediction lacks through only when
    it sent no bytes."""
    comm = (Traffic("fsdp_all_gather", "dp_shard_cp", 2, 96), Traffic("ep_all_to_all", "ep", 0, 0))
    right = {"fsdp_all_gather[dp_shard_cp]": (2, 96), "cp_guard_all_reduce[world]": (1, 0)}
    assert_counted_as_predicted(right, comm, 0)
    for wrong in (
        {"fsdp_all_gather[dp_shard_cp]": (3, 96)},  # calls
        {"fsdp_all_gather[dp_shard_cp]": (2, 95)},  # bytes
        {"fsdp_all_gather[world]": (2, 96)},  # axis
        {},  # a predicted kind not counted
        {**right, "ep_all_to_all[ep]": (1, 8)},  # a kind predicted with no calls sent bytes
    ):
        with pytest.raises(AssertionError, match=r"^rank 3: kind\[axis\]: \(counted, predicted\)"):
            assert_counted_as_predicted(wrong, comm, 3)


@settings(max_examples=examples(5), deadline=None)
@given(case=cases(world_size=4), bias=st.booleans(), aux=st.booleans())
def test_comm_bytes_equal_counted_bytes_on_real_ranks(pool4: RankPool, case, bias, aux):
    """Every collective a step issues (FSDP all-gather / reduce-scatter / HSDP all-reduce,
    gradient all-reduce without FSDP, EP all-to-all for the routing drawn or the all-gather
    dispatcher's all-gathers / reduce-scatters, CP K/V all-gather / reduce-scatter, with a
    routing bias its load counters' all-reduce, with an aux loss under CP its statistics'
    all-reduce / all-gather / reduce-scatter), counted on 4 gloo ranks, equals the prediction:
    calls and bytes, per kind and axis, on every rank. Without FSDP (whose buffers the meter
    would see) and EP (whose activations follow the routing drawn), activations are within 5%
    of each rank's meter."""
    pipeline, degrees, _ = case
    spec = _spec(degrees, routing_bias=bias, aux_loss_coef=0.01 * aux)
    fsdp = any(isinstance(p, FSDP) for p in pipeline)
    results = pool4.run(measure_step, spec, pipeline, degrees, meter=not fsdp)
    for rank, got in enumerate(results):
        routing = drawn_routing(results, rank) if degrees.ep > 1 else None
        p = predict(
            spec.config, degrees, pipeline, seq=spec.seq_len, micro_batch=spec.rows_per_rank,
            routing=routing, ep_rank=got["ep_rank"],
        )  # fmt: skip
        assert_counted_as_predicted(got["comm"], p.comm, rank)
        if not fsdp and degrees.ep == 1:
            real = got["activations"]
            assert abs(p.activations - real) <= 0.05 * real, (rank, p.activations, real)


# Sizes tensor parallelism divides at tp=2 (heads, kv heads, vocabulary, MLP widths).
TP_CONFIG = attrs.evolve(CONFIG, vocab_size=68, num_kv_heads=2, tie_embeddings=False)


@st.composite
def tp_cases(draw: st.DrawFn) -> tuple[Pipeline, MeshDegrees]:
    """tp=2 on 4 ranks with the other 2 ranks as dp_shard, dp_replicate (under FSDP), cp or
    ep; any checkpointing mode; FSDP or not."""
    rest = draw(st.sampled_from(["dp_shard", "dp_replicate", "cp", "ep"]))
    degrees = MeshDegrees(
        dp_shard=1 if rest in ("dp_replicate", "cp") else 2,
        dp_replicate=2 if rest == "dp_replicate" else 1,
        cp=2 if rest == "cp" else 1,
        ep=2 if rest == "ep" else 1,
        tp=2,
    )
    passes: list[Pass] = [TensorParallel()]
    passes += [ContextParallel()] * (degrees.cp > 1)
    passes += [ExpertParallel()] * (degrees.ep > 1)
    passes += _ac(draw(st.sampled_from(MODES)))
    if rest == "dp_replicate" or draw(st.booleans()):
        passes.append(draw(fsdps()))
    return Pipeline(tuple(passes)), degrees


@settings(max_examples=examples(3), deadline=None)
@given(case=tp_cases(), bias=st.booleans(), aux=st.booleans())
def test_tp_predictions_equal_real_ranks(pool4: RankPool, case, bias, aux):
    """`TensorParallel` at tp=2 on 4 gloo ranks: parameter, gradient and AdamW bytes equal the
    held shards exactly; every collective (tp all-reduces and the logits all-gather, FSDP's on
    the tp-local shards, gradient sync, the routing-load and aux-loss statistics' sums when
    drawn) equals the counted calls and bytes; without FSDP and EP, activations are within 5%
    of each rank's meter."""
    pipeline, degrees = case
    config = attrs.evolve(TP_CONFIG, routing_bias=bias, aux_loss_coef=0.01 * aux)
    spec = attrs.evolve(SPEC, config=config)
    fsdp = any(isinstance(p, FSDP) for p in pipeline)
    held = pool4.run(held_bytes, spec, pipeline, degrees)
    results = pool4.run(measure_step, spec, pipeline, degrees, meter=not fsdp)
    for rank, got in enumerate(results):
        routing = drawn_routing(results, rank) if degrees.ep > 1 else None
        p = predict(
            config, degrees, pipeline, seq=spec.seq_len, micro_batch=spec.rows_per_rank,
            routing=routing, ep_rank=got["ep_rank"],
        )  # fmt: skip
        state = p.state
        assert (state.params, state.grads, state.optimizer) == max(
            (h["params"], h["grads"], h["optimizer"]) for h in held
        )
        assert_counted_as_predicted(got["comm"], p.comm, rank)
        if not fsdp and degrees.ep == 1:
            real = got["activations"]
            assert abs(p.activations - real) <= 0.05 * real, (rank, p.activations, real)


@pytest.mark.parametrize(
    "degrees", [MeshDegrees(dp_shard=2, tp=2), MeshDegrees(cp=2, tp=2)], ids=["dp", "cp"]
)
def test_tp_selective_checkpointing_predictions_equal_real_ranks(pool4: RankPool, degrees):
    """`TensorParallel | ActivationCheckpoint(mode="selective")` (which `autoplan` proposes):
    activations within 5% of each of 4 gloo ranks' meter, every collective's calls and bytes
    equal to the counted ones."""
    spec = attrs.evolve(SPEC, config=TP_CONFIG)
    passes: list[Pass] = [TensorParallel(), *[ContextParallel()] * (degrees.cp > 1)]
    pipeline = Pipeline((*passes, ActivationCheckpoint(mode="selective")))
    p = predict(TP_CONFIG, degrees, pipeline, seq=spec.seq_len, micro_batch=spec.rows_per_rank)
    for rank, got in enumerate(pool4.run(measure_step, spec, pipeline, degrees, meter=True)):
        assert_counted_as_predicted(got["comm"], p.comm, rank)
        real = got["activations"]
        print(f"rank {rank}: activations predicted {p.activations}, measured {real}")
        assert abs(p.activations - real) <= 0.05 * real, (rank, p.activations, real)


def test_uniform_routing_is_between_best_and_worst():
    """Without a routing the EP bytes are the uniform router's; the worst case is larger."""
    degrees = MeshDegrees(dp_shard=4, ep=4)
    p = predict(CONFIG, degrees, ExpertParallel() | FSDP(), seq=8, micro_batch=2)
    (a2a,) = [t for t in p.comm if t.kind == "ep_all_to_all"]
    assert 0 < a2a.bytes < a2a.worst_bytes and p.bytes_moved < p.bytes_moved_worst
    assert p.flops_worst > p.flops > 0


# --------------------------------------------------------------------- autoplan on real ranks


def assert_candidate_trains_like_one_process(pool: RankPool, spec: TrainSpec, best) -> None:
    """`best` (a `Candidate`) applied on the pool's ranks through the public training loop:
    loss and every gradient each step, then the parameters, equal the one-process model's."""
    degrees = best.degrees
    data_ranks = degrees.dp_replicate * degrees.dp_shard
    ignore = torch.zeros(
        spec.steps, data_ranks * spec.rows_per_rank, spec.seq_len, dtype=torch.bool
    )
    results = pool.run(training_loop.public_loop, spec, best.pipeline, degrees, ignore)
    ref = train(build_model(spec), training_loop.masked_batches(spec, data_ranks, ignore), spec.lr)
    assert_matches_reference(results, ref)


BUDGET = 64 * 1024


def test_top_candidate_trains_like_one_process(pool4: RankPool):
    """The best candidate for a budget, applied on 4 gloo ranks, trains like one process."""
    spec = attrs.evolve(SPEC, steps=2, lr=1e-3)
    result = autoplan(
        CONFIG, world=4, memory_per_rank=BUDGET, seq=spec.seq_len, micro_batch=spec.rows_per_rank,
        ac_modes=("none", "full"),
    )  # fmt: skip
    assert result.fits and result.misses, "the budget should split the candidates"
    best = result.best
    assert best.prediction.memory <= BUDGET
    assert [c.cost for c in result.fits] == sorted(c.cost for c in result.fits)
    assert_candidate_trains_like_one_process(pool4, spec, best)


def test_top_tensor_parallel_candidate_trains_like_one_process(pool4: RankPool):
    """With tensor parallelism allowed, the best candidate for a 44 KiB budget has tp=2 (it
    halves the attention and MLP activations); applied on 4 gloo ranks it trains like one
    process. (44, not 41: under FSDP's default `min_unit_bytes` the small blocks share one
    unit, whose gathered buffer is larger than one block's.)"""
    spec = attrs.evolve(SPEC, config=TP_CONFIG, steps=2, lr=1e-3)
    result = autoplan(
        TP_CONFIG, world=4, memory_per_rank=44 * 1024, seq=spec.seq_len,
        micro_batch=spec.rows_per_rank, ac_modes=("none", "full", "selective"), passes_allowed=PASSES,
    )  # fmt: skip
    best = result.best
    assert best.degrees.tp == 2 and isinstance(best.pipeline.passes[0], TensorParallel)
    assert best.prediction.memory <= 44 * 1024 and result.misses
    tp_modes = {
        repr(p) for c in result.fits + result.misses if c.degrees.tp > 1 for p in c.pipeline
    }
    assert "ActivationCheckpoint(mode='selective')" in tp_modes  # proven below
    assert_candidate_trains_like_one_process(pool4, spec, best)


def test_all_gather_dispatcher_wins_when_top_k_exceeds_ep(pool2: RankPool):
    """With top_k 4 over ep 2 the all-gather dispatcher sends fewer bytes than all-to-all (every
    token once to the other rank, not ~2 of its 4 copies): `autoplan` ranks it first, and on 2
    gloo ranks its collectives equal the prediction (calls and bytes, every kind) and the
    ep-group mean of the meter is within 5% of the predicted activations."""
    config = attrs.evolve(CONFIG, top_k=4, expert_hidden_size=64)
    spec = attrs.evolve(SPEC, config=config)
    result = autoplan(
        config, world=2, memory_per_rank=2**30, seq=spec.seq_len, micro_batch=spec.rows_per_rank,
        ac_modes=("none",),
    )  # fmt: skip
    best = result.best
    assert best.pipeline == Pipeline((ExpertParallel(dispatcher="all_gather"),))
    assert best.degrees == MeshDegrees(dp_shard=2, ep=2)
    rival = next(c for c in result.fits if c.pipeline == Pipeline((ExpertParallel(),)))
    assert rival.degrees == best.degrees and rival.cost > best.cost
    results = pool2.run(measure_step, spec, best.pipeline, best.degrees, meter=True)
    for rank, got in enumerate(results):
        assert_counted_as_predicted(got["comm"], best.prediction.comm, rank)
    mean = sum(got["activations"] for got in results) / len(results)
    predicted = best.prediction.activations
    print(f"all-gather activations: predicted {predicted}, measured mean {mean}")
    assert abs(predicted - mean) <= 0.05 * mean


def test_a_rejected_candidate_exceeds_the_budget_on_the_meter(pool4: RankPool):
    """A candidate predicted over budget (parameter state within it, activations not; no FSDP
    or EP, so nothing routing- or buffer-dependent) holds more than the budget on 4 gloo ranks:
    measured parameter, gradient and AdamW bytes + `LiveActivationMeter` bytes."""
    budget = 96 * 1024
    result = autoplan(
        CONFIG, world=4, memory_per_rank=budget, seq=SPEC.seq_len,
        micro_batch=SPEC.rows_per_rank, passes_allowed=("ac", "cp", "fsdp"),
    )  # fmt: skip
    miss = next(
        c
        for c in result.misses
        if c.degrees.ep == 1 and not any(isinstance(p, FSDP) for p in c.pipeline)
    )
    assert miss.prediction.state.total <= budget < miss.prediction.memory
    spec = _spec(miss.degrees)
    held = pool4.run(held_bytes, spec, miss.pipeline, miss.degrees)
    acts = pool4.run(measure_step, spec, miss.pipeline, miss.degrees, meter=True)
    measured = max(
        h["params"] + h["grads"] + h["optimizer"] + a["activations"]
        for h, a in zip(held, acts, strict=True)
    )
    assert measured > budget
    assert abs(measured - miss.prediction.memory) <= 0.05 * measured


# ------------------------------------------------------------------------------ answers and UX


def test_nothing_fits_says_what_is_smallest_and_by_how_much():
    """No fit: `.best` raises `NoFittingPlanError` naming the smallest candidate and the gap."""
    tiny = autoplan(CONFIG, world=2, memory_per_rank=1000, seq=8)
    assert not tiny.fits and tiny.closest is None and tiny.pruned == tiny.considered
    with pytest.raises(
        NoFittingPlanError,
        match=r"^No mesh and pipeline fits 1000 B per rank \(\d+ candidates\); parameters, "
        r"gradients and AdamW state alone need at least [\d.]+ KiB \(\+[\d.]+ KiB\)\.$",
    ):
        _ = tiny.best
    state = state_bytes(ModelShapes.of(CONFIG), MeshDegrees(dp_shard=2), Pipeline((FSDP(),)))
    close = autoplan(
        CONFIG, world=2, memory_per_rank=state.total + 100, seq=8, passes_allowed=("fsdp",)
    )
    assert close.closest is not None and not close.fits
    with pytest.raises(
        NoFittingPlanError,
        match=r"the smallest needs [\d.]+ KiB \(\+[\d.]+ KiB\): Pipeline\(\(FSDP\(reshard_after_forward=True\),\)\) on dp_replicate=1 dp_shard=2 cp=1 ep=1: memory",
    ):
        _ = close.best
    assert "No mesh and pipeline fits" in str(close)


def test_unknown_passes_and_modes_are_refused():
    """Passes and checkpointing modes outside the known ones raise ValueError."""
    with pytest.raises(ValueError, match=r"Unknown pass or checkpointing mode \('pp'\)"):
        autoplan(CONFIG, world=2, memory_per_rank=2**30, seq=8, passes_allowed=("pp",))
    with pytest.raises(ValueError, match=r"Unknown pass or checkpointing mode \('half'\)"):
        autoplan(CONFIG, world=2, memory_per_rank=2**30, seq=8, ac_modes=("half",))


def test_frontier_and_cost_model():
    """The frontier is not dominated; a latency cost ranks fewer collectives first."""
    r = autoplan(CONFIG, world=4, memory_per_rank=2**30, seq=8, micro_batch=2, max_cp=2)
    front = r.frontier()
    assert front and all(
        a.prediction.memory <= b.prediction.memory for a, b in itertools.pairwise(front)
    )
    assert all(a.cost > b.cost for a, b in itertools.pairwise(front))
    slow = CostModel(bandwidth={"*": 1e9, "ep": 1e6}, latency=1e-3)
    p = r.best.prediction
    assert slow.cost(p) == pytest.approx(
        sum(t.calls * 1e-3 + t.bytes / (1e6 if t.axis == "ep" else 1e9) for t in p.comm) / p.tokens
    )
    assert "| 1 |" in r.table() and "candidates fit" in str(r)


def test_fsdp_options_trade_memory_for_bytes():
    """The reshard policy is a candidate dimension: "auto" (the default) keeps the units that
    fit gathered, True none, False all; memory rises and bytes sent fall in that order, and the
    table shows what each keeps."""
    keep, lean, auto = (FSDP(reshard_after_forward=v) for v in (False, True, "auto"))
    r = autoplan(
        CONFIG, world=4, memory_per_rank=2**30, seq=8, passes_allowed=("fsdp",),
        fsdp_options=(auto, lean, keep),
    )  # fmt: skip
    by = {(c.degrees, c.pipeline): c.prediction for c in r.fits}
    d = MeshDegrees(dp_shard=4)
    p_lean, p_auto, p_keep = (by[(d, Pipeline((f,)))] for f in (lean, auto, keep))
    assert p_lean.memory < p_auto.memory <= p_keep.memory
    assert p_lean.bytes_moved > p_auto.bytes_moved >= p_keep.bytes_moved
    assert p_lean.fsdp_resident == 0 < p_auto.fsdp_resident
    assert "| kept gathered |" in r.table()
    default = autoplan(CONFIG, world=4, memory_per_rank=2**30, seq=8, passes_allowed=("fsdp",))
    assert {c.pipeline for c in default.fits} == {Pipeline((auto,)), Pipeline((lean,)), Pipeline()}


@pytest.mark.parametrize("world", [nightly_param(256, why="ci plans world 1024"), 1024])
def test_deepseek_v3_plans_at_256_and_1024_ranks(world: int):
    """The 685B DeepSeek-V3-shaped model plans at world 256 and 1024: the best candidate fits 80
    GiB with expert parallelism, and the CP refusal is said (how long it takes is measured in
    `benchmarks/autoplan_time.py`, not asserted; the wall time is printed)."""
    config = MoEConfig.deepseek_v3_shaped()
    wall, cpu = time.perf_counter(), time.process_time()
    r = autoplan(config, world=world, memory_per_rank=80 * 2**30, seq=4096)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"DeepSeek-V3 autoplan at world {world}: {wall:.1f} s wall, {cpu:.1f} s CPU")
    best = r.best
    assert best.prediction.memory <= 80 * 2**30
    assert any(isinstance(p, ExpertParallel) for p in best.pipeline)
    assert r.refused  # ContextParallel refuses the MTP head: said, not silently dropped


def test_cli_prints_the_ranking_and_the_miss(capsys: pytest.CaptureFixture[str]):
    """`moetx autoplan` prints the table and the best pair; nothing fitting exits 1."""
    assert main(["autoplan", "--world", "2", "--memory", "300KiB", "--seq", "8", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "| 1 |" in out and "best: " in out and "moetx autoplan took" in out
    assert main(["autoplan", "--world", "2", "--memory", "1KiB", "--seq", "8"]) == 1
    assert "No mesh and pipeline fits 1.00 KiB per rank" in capsys.readouterr().out
    assert main(["autoplan", "--passes", "pp"]) == 2
    assert "Unknown pass" in capsys.readouterr().err


def test_passes_it_does_not_model_are_refused():
    """A pass or option the predictors do not model is refused, never silently mispredicted:
    an unknown stage and a tp degree the model's sizes do not allow (CONFIG has one kv head);
    ring CP and sequence parallelism are predicted (tests/test_predict_ring_sp.py)."""

    @attrs.frozen(kw_only=True, repr=False)
    class Compile(Pass):
        placement = Placement("compile", after={"ac"}, before={"fsdp"})

        def _apply(self, model, mesh, record):  # type: ignore[no-untyped-def]
            return model

    with pytest.raises(ValueError, match=r"^`predict` models \(.*\) only, not Compile\(\)") as e:
        predict(CONFIG, MeshDegrees(), Pipeline((Compile(),)), seq=8)
    assert str(e.value).endswith(
        "  fix: predict the pipeline without it for parameters and collectives (a "
        "compiled block issues the eager block's collectives); what a compiled block saves for "
        "backward is the compiler's choice, which the meta trace cannot see."
    )
    with pytest.raises(PlanningError, match=r"^`TensorParallel` cannot shard this model over tp=2"):
        predict(CONFIG, MeshDegrees(tp=2), Pipeline((TensorParallel(),)), seq=8)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_hf_state_bytes_equal_real_ranks(pool4: RankPool, family: str):
    """A tiny Hugging Face MoE model's parameter, gradient and AdamW bytes from its shapes
    equal the shards 4 gloo ranks hold under EP | FSDP ("auto") and under EP | AC | FSDP(True)
    with HSDP, exactly; `predict` traces its activations on meta as well."""
    spec = HFSpec(family=family, steps=1)
    model = hf_build_model(spec)
    shapes = ModelShapes.of(model)
    for degrees, pipeline in (
        (MeshDegrees(dp_shard=4, ep=2), ExpertParallel() | FSDP()),
        (
            MeshDegrees(dp_replicate=2, dp_shard=2, ep=2),
            ExpertParallel() | ActivationCheckpoint() | FSDP(reshard_after_forward=True),
        ),
    ):
        got = state_bytes(shapes, degrees, pipeline)
        held = pool4.run(hf_held_bytes, spec, pipeline, degrees)
        assert (got.params, got.grads, got.optimizer) == max(
            (h["params"], h["grads"], h["optimizer"]) for h in held
        )
    # Its activations are traced on meta too (within 5% of real ranks: tests/test_autoplan_hf.py).
    p = predict(model, MeshDegrees(dp_shard=4, ep=2), ExpertParallel() | FSDP(), seq=8)
    assert p.activations > 0 and p.state == state_bytes(
        shapes, MeshDegrees(dp_shard=4, ep=2), ExpertParallel() | FSDP()
    )


def test_a_module_predicts_as_its_config():
    """A module (traced whole, on a meta copy) predicts what its config (traced shallow) does."""
    pipeline = Pipeline((ActivationCheckpoint(mode="full"),))
    from_config = predict(CONFIG, MeshDegrees(), pipeline, seq=8, micro_batch=2)
    from_module = predict(build_model(SPEC), MeshDegrees(), pipeline, seq=8, micro_batch=2)
    assert from_config == from_module


def test_public_names():
    """`autoplan` and its result types are exported from `moetx`."""
    assert moetx.autoplan is autoplan and moetx.predict is predict
    assert {"AutoPlan", "Candidate", "CostModel", "NoFittingPlanError", "Prediction"} <= set(
        moetx.__all__
    )
