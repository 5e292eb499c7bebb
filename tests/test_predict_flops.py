"""`predict`'s FLOPs per step, recomputation included: equal to torch's `FlopCounterMode` count of a
real CPU forward + backward in every `ActivationCheckpoint` mode, on models hypothesis draws; under
context, expert and tensor parallelism, to each gloo rank's count (tp: of its local kernels)."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetx import ContextParallel, ExpertParallel, MeshDegrees, Pipeline, TensorParallel
from moetx.mesh.parallel_mesh import ParallelMesh
from moetx.models import MoEConfig
from moetx.models.config import SCORE_FUNCS
from moetx.planning import predict
from moetx.testing import RankPool, examples, fake_world, hf, nightly_param
from moetx.testing.train import TrainSpec, build_model, global_batches
from tests.bodies.predict_flops import (
    count_step,
    hf_rank_local_flops,
    rank_flops,
    rank_local_flops,
)
from tests.test_autoplan import MODES, TP_CONFIG, _ac


@st.composite
def configs(draw: st.DrawFn) -> MoEConfig:
    """Small models: 1-3 blocks, any of them dense, shared experts, top-k, an MTP block or not,
    the router's options (score function, bias, normalisation, aux loss)."""
    layers = draw(st.integers(1, 3))
    experts = draw(st.sampled_from([2, 4]))
    heads = draw(st.sampled_from([1, 2]))
    return MoEConfig(
        vocab_size=draw(st.integers(17, 40)),
        hidden_size=heads * draw(st.sampled_from([4, 6])),
        num_heads=heads,
        num_kv_heads=draw(st.sampled_from([1, heads])),
        num_layers=layers,
        num_dense_layers=draw(st.integers(0, layers)),
        num_experts=experts,
        top_k=draw(st.integers(1, experts)),
        expert_hidden_size=draw(st.integers(3, 8)),
        num_shared_experts=draw(st.integers(0, 1)),
        dense_hidden_size=draw(st.integers(5, 10)),
        num_mtp_layers=draw(st.integers(0, 1)),
        score_func=draw(st.sampled_from(SCORE_FUNCS)),
        routing_bias=draw(st.booleans()),
        norm_topk_prob=draw(st.booleans()),
        aux_loss_coef=draw(st.sampled_from([0.0, 0.01])),
        tie_embeddings=draw(st.booleans()),
    )


def counted_flops(spec: TrainSpec | hf.HFSpec, mode: str) -> int:
    """The counted FLOPs of one step of `spec`'s model (moetx's or Hugging Face's) with
    checkpointing `mode` applied, on one process."""
    if isinstance(spec, hf.HFSpec):
        model, (ids, labels) = hf.build_model(spec), hf.global_batches(spec, 1)[0]
    else:
        model, (ids, labels) = build_model(spec), global_batches(spec, 1)[0]
    with fake_world(1):
        if _ac(mode):
            model = Pipeline(tuple(_ac(mode))).apply(model, ParallelMesh.build())
        return count_step(model, {"input_ids": ids, "labels": labels})


@settings(max_examples=examples(10))
@given(config=configs(), seq=st.sampled_from([8, 12]), rows=st.integers(1, 2))
def test_flops_equal_the_counted_forward_backward_and_recomputation(
    config: MoEConfig, seq: int, rows: int
):
    """For each checkpointing mode (none, full, router, selective, full every 2nd block) the
    predicted FLOPs are those counted in a real step: a recomputed block reruns its forward only
    up to its last saved tensor (torch's early stop), less what its mode saved."""
    spec = TrainSpec(config=config, steps=1, rows_per_rank=rows, seq_len=seq)
    blocks = config.num_layers + config.num_mtp_layers
    for mode in MODES:
        if (mode == "router" and config.num_dense_layers == config.num_layers) or (
            mode == "full/2" and blocks < 2
        ):
            continue  # refused by `ActivationCheckpoint.check`
        got = predict(config, MeshDegrees(), Pipeline(tuple(_ac(mode))), seq=seq, micro_batch=rows)
        assert got.flops == counted_flops(spec, mode), mode


def test_recomputation_stops_at_the_last_saved_tensor():
    """The mechanics behind the property, counted by hand. A recomputed dense block reruns every
    matmul and its attention but `down_proj`'s: that matmul's input is the block's last saved
    tensor, which autograd saves before the kernel runs, and torch stops recomputing there. Router
    mode also skips the router's projection (saved); selective mode saves every matmul and the
    attention, so it reruns no FLOPs."""
    config = MoEConfig(
        vocab_size=31, hidden_size=8, num_heads=2, num_kv_heads=1, num_layers=1,
        num_dense_layers=1, dense_hidden_size=10, num_experts=4, top_k=2, expert_hidden_size=6,
    )  # fmt: skip
    spec = TrainSpec(config=config, steps=1, rows_per_rank=2, seq_len=8)
    t, h, d, width = 2 * 8, config.hidden_size, config.hidden_size // 2, config.dense_hidden_size
    projections = 2 * t * h * (2 * d + d + d + 2 * d)  # q (2 heads), k, v (1 head each), o
    mlp = 2 * 2 * t * h * width  # gate and up; not down
    attention = 4 * 2 * 2 * 8 * 8 * d // 2
    flops = {mode: counted_flops(spec, mode) for mode in ("none", "full", "selective")}
    assert flops["full"] - flops["none"] == projections + mlp + attention
    assert flops["selective"] == flops["none"]
    for mode in ("full", "selective"):
        pred = predict(config, MeshDegrees(), Pipeline(tuple(_ac(mode))), seq=8, micro_batch=2)
        assert pred.flops == flops[mode], mode

    moe = MoEConfig(vocab_size=31, hidden_size=8, num_layers=1, num_experts=4, top_k=2)
    spec = TrainSpec(config=moe, steps=1, rows_per_rank=2, seq_len=8)
    full, router = counted_flops(spec, "full"), counted_flops(spec, "router")
    assert full - router == 2 * t * h * moe.num_experts
    pred = predict(moe, MeshDegrees(), Pipeline(tuple(_ac("router"))), seq=8, micro_batch=2)
    assert pred.flops == router


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_hf_flops_equal_the_counted_ones(family: str):
    """Hugging Face models (their `_grouped_mm` experts; DeepSeek-V3's dense first layer, shared
    experts and grouped router) in every checkpointing mode: predicted FLOPs equal the counted."""
    pytest.importorskip("transformers", reason="needs Hugging Face transformers>=5")
    spec = hf.HFSpec(family=family, steps=1)
    for mode in MODES:
        pipeline = Pipeline(tuple(_ac(mode)))
        got = predict(
            hf.build_model(spec), MeshDegrees(), pipeline, seq=spec.seq_len,
            micro_batch=spec.rows_per_rank,
        )  # fmt: skip
        assert got.flops == counted_flops(spec, mode), mode


@pytest.mark.parametrize("comm", ["allgather", "p2p"])
def test_context_parallel_flops_equal_every_rank(pool2: RankPool, comm: str):
    """ContextParallel (all-gather and ring) on 2 gloo ranks, each checkpointing mode: every
    rank's counted FLOPs (load balanced: alike) equal the prediction; the ring's recomputation
    reruns its attention blocks, selective mode saves them."""
    spec = TrainSpec(config=TP_CONFIG, steps=1, rows_per_rank=2, seq_len=16)
    degrees = MeshDegrees(cp=2)
    for mode in MODES:
        pipeline = Pipeline((ContextParallel(comm=comm), *_ac(mode)))
        p = predict(TP_CONFIG, degrees, pipeline, seq=16, micro_batch=2)
        assert pool2.run(rank_flops, spec, pipeline, degrees) == [p.flops] * 2, mode


@pytest.mark.parametrize("dispatcher", ["all_to_all", "all_gather"])
def test_expert_parallel_flops_average_to_the_prediction(pool2: RankPool, dispatcher: str):
    """ExpertParallel on 2 gloo ranks, each checkpointing mode: a rank's expert FLOPs follow the
    routing drawn, their sum over the ep group does not (every token copy is computed once, and
    recomputed once where the mode reruns experts), and equals the prediction (a balanced
    router's) times the ranks; the most loaded rank is within `flops_worst`."""
    spec = TrainSpec(config=TP_CONFIG, steps=1, rows_per_rank=2, seq_len=16)
    degrees = MeshDegrees(dp_shard=2, ep=2)
    for mode in MODES:
        pipeline = Pipeline((ExpertParallel(dispatcher=dispatcher), *_ac(mode)))
        p = predict(TP_CONFIG, degrees, pipeline, seq=16, micro_batch=2)
        counted = pool2.run(rank_flops, spec, pipeline, degrees)
        assert sum(counted) == 2 * p.flops, (mode, counted, p.flops)
        assert max(counted) <= p.flops_worst, mode


#: tp configs: TP_CONFIG (one dense block, two MoE blocks with a shared expert); two dense blocks
#: and no shared expert; four heads for tp=4.
_TP4 = dict(hidden_size=16, num_heads=4, num_kv_heads=4, dense_hidden_size=12, expert_hidden_size=8)
TP_CONFIGS = {
    "shared": TP_CONFIG,
    "dense": attrs.evolve(TP_CONFIG, num_dense_layers=2, num_shared_experts=0),
    "tp4": attrs.evolve(TP_CONFIG, **_TP4),
}


def _replicated_matmuls(config: MoEConfig, tokens: int) -> int:
    """A step's FLOPs in what tp replicates (routers, routed experts), by hand: forward and
    backward (2x) of the router's `[T, h] x [h, E]` and the experts' three `h x w` matmuls
    over the `T·k` token copies, per MoE block."""
    h, w, k = config.hidden_size, config.expert_hidden_size, config.top_k
    per_block = 2 * tokens * h * config.num_experts + 3 * 2 * tokens * k * h * w
    return 3 * config.num_moe_layers * per_block


@pytest.mark.parametrize(
    "tp, name, sequence",
    [
        (2, "shared", False),
        (2, "shared", True),
        (2, "dense", False),
        nightly_param(4, "tp4", True, why="ci: sequence parallelism at tp 2"),
    ],
)
def test_tensor_parallel_flops_equal_every_rank(
    pool2: RankPool, pool4: RankPool, tp: int, name: str, sequence: bool
):
    """TensorParallel (with or without sequence parallelism) on 2 and 4 gloo ranks, each
    checkpointing mode: every rank's count of the kernels it runs (its heads and MLP columns,
    not the DTensors' global shapes) equals the prediction. The count is checked on its own:
    without checkpointing the profiler's matmul kernels equal it, and summed over the tp ranks
    the matmuls are one process's (tp=1) plus the replicated routers' and experts' once more
    per extra rank (computed by hand)."""
    config, pool = TP_CONFIGS[name], pool2 if tp == 2 else pool4
    spec = TrainSpec(config=config, steps=1, rows_per_rank=2, seq_len=16)
    degrees = MeshDegrees(tp=tp)
    for mode in MODES:
        pipeline = Pipeline((TensorParallel(sequence_parallel=sequence), *_ac(mode)))
        p = predict(config, degrees, pipeline, seq=16, micro_batch=2)
        counted = pool.run(rank_local_flops, spec, pipeline, degrees, profile=mode == "none")
        assert [c["flops"] for c in counted] == [p.flops] * tp, (mode, counted, p.flops)
        if mode == "none":
            assert all(c["profiled"] == c["matmuls"] for c in counted), counted
            one = pool.run(rank_local_flops, spec, Pipeline(()), MeshDegrees(dp_shard=tp))[0]
            extra = (tp - 1) * _replicated_matmuls(config, 2 * 16)
            assert sum(c["matmuls"] for c in counted) == one["matmuls"] + extra
            assert one["flops"] == counted_flops(spec, "none")  # the count is FlopCounterMode's


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_hf_tensor_parallel_flops_equal_every_rank(pool2: RankPool, family: str):
    """Hugging Face models under TensorParallel on 2 gloo ranks (DeepSeek-V3's latent attention:
    column-wise low-rank projections, a replicated rotary key; Mixtral's grouped-query attention
    with 2 kv heads), each checkpointing mode: every rank's count of its local kernels equals
    the prediction."""
    pytest.importorskip("transformers", reason="needs Hugging Face transformers>=5")
    kv = (("num_key_value_heads", 2),) if family == "mixtral" else ()  # the tiny one has 1
    spec = hf.HFSpec(family=family, steps=1, overrides=kv)
    degrees = MeshDegrees(tp=2)
    for mode in MODES:
        pipeline = Pipeline((TensorParallel(), *_ac(mode)))
        p = predict(
            hf.build_model(spec), degrees, pipeline, seq=spec.seq_len,
            micro_batch=spec.rows_per_rank,
        )  # fmt: skip
        assert pool2.run(hf_rank_local_flops, spec, pipeline, degrees) == [p.flops] * 2, mode
