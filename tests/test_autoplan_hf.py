"""`predict` and `autoplan` on Hugging Face MoE models, proven on real gloo ranks (issue 18).

HF's forward runs on `meta` like moetx's own models (`moetx.planning.predict_activations`: the
packed-sequence check answers "plain", CPU `_grouped_mm` gets a meta output, and routing
bookkeeping runs on CPU twins of the small tensors, `moetx.planning.meta_values`), with
`ExpertParallel` applied in the trace, so a tiny Qwen3-MoE, Mixtral and DeepSeek-V3 get traced
activations, and `autoplan` plans them.
"""

from __future__ import annotations

import pytest
import torch

from moetx import (
    FSDP,
    ActivationCheckpoint,
    ContextParallel,
    ExpertParallel,
    MeshDegrees,
    Pipeline,
    TensorParallel,
)
from moetx.planning import autoplan, predict
from moetx.testing import RankPool
from moetx.testing.hf import HFSpec, build_model
from tests.bodies.autoplan import assert_counted_as_predicted, predicted_comm
from tests.bodies.autoplan_hf import hf_measure_step, hf_one_process_activations
from tests.bodies.hf import hf_rank_train
from tests.test_hf_models import assert_training_parity

pytest.importorskip(
    "transformers", reason="needs Hugging Face transformers>=5 (`pip install -e .[hf]`)"
)

FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["none", "full", "router", "selective"])
def test_hf_activations_within_5_percent_of_real_ranks(pool4: RankPool, family: str, mode: str):
    """EP | FSDP and EP | AC | FSDP (each checkpointing mode) on 4 gloo ranks (dp_shard=4,
    ep=2): the traced activations are within 5% of the meter. A rank's routed tensors follow the
    routing drawn (a tiny router is far from balanced: up to ±16% a rank), so where a mode keeps
    them (none, selective) the prediction (a balanced router) is checked against the ep-group
    mean, which no routing changes (every copy is kept on exactly one rank); where it keeps none
    (full, router), against every rank."""
    spec = HFSpec(family=family, steps=1)
    ac = [] if mode == "none" else [ActivationCheckpoint(mode=mode)]
    pipeline = Pipeline((ExpertParallel(), *ac, FSDP(reshard_after_forward=True)))
    degrees = MeshDegrees(dp_shard=4, ep=2)
    model = build_model(spec)
    p = predict(model, degrees, pipeline, seq=spec.seq_len, micro_batch=spec.rows_per_rank)
    assert p.fsdp_resident == 0  # every unit reshards: the meter sees activations alone
    real = [got["activations"] for got in pool4.run(hf_measure_step, spec, pipeline, degrees)]
    mean = sum(real) / len(real)
    print(
        f"{family} {mode}: predicted {p.activations}, measured {real}: mean {p.activations / mean - 1:+.3%}"
    )
    assert abs(p.activations - mean) <= 0.05 * mean, (p.activations, real)
    if mode in ("full", "router"):
        assert all(abs(p.activations - r) <= 0.05 * r for r in real), (p.activations, real)


@pytest.mark.parametrize(
    "comm,mode,logits",
    [("allgather", "none", False), ("allgather", "full", True), ("p2p", "none", True),
     ("p2p", "full", False)],
)  # fmt: skip
def test_hf_context_parallel_predictions_equal_real_ranks(
    pool4: RankPool, comm: str, mode: str, logits: bool
):
    """Qwen3-MoE (2 K/V heads) under CP | AC | FSDP on 4 gloo ranks (dp_shard=2, cp=2; labels
    shifted over whole rows, each rank its chunk, as training feeds it), with the router aux loss
    (`output_router_logits`) or not: the trace (the CP recipe's inputs on meta) is within 5% of
    every rank's meter, and the collectives equal the counted ones (the batch check's flag
    all-reduce over the world and the aux loss's statistics over cp included)."""
    overrides = (("output_router_logits", logits), ("num_key_value_heads", 2))
    spec = HFSpec(family="qwen3_moe", steps=1, seq_len=16, overrides=overrides)
    ac = [] if mode == "none" else [ActivationCheckpoint(mode=mode)]
    pipeline = Pipeline((ContextParallel(comm=comm), *ac, FSDP(reshard_after_forward=True)))
    degrees = MeshDegrees(dp_shard=2, cp=2)
    p = predict(
        build_model(spec), degrees, pipeline, seq=spec.seq_len, micro_batch=spec.rows_per_rank
    )
    got = pool4.run(hf_measure_step, spec, pipeline, degrees)
    real = [g["activations"] for g in got]
    assert all(abs(p.activations - r) <= 0.05 * r for r in real), (p.activations, real)
    want = predicted_comm(p.comm)
    assert want["cp_guard_all_reduce[world]"] == (1, 2 * 3 * 40 // 4)  # 5 int64 flags
    assert ("aux_all_gather[cp]" in want) == logits
    for rank, g in enumerate(got):
        assert_counted_as_predicted(g["comm"], p.comm, rank)


def test_hf_latent_attention_collectives_equal_real_ranks(pool4: RankPool):
    """DeepSeek-V3 (latent attention) under TP | CP | AC | FSDP on 4 gloo ranks (cp=2, tp=2),
    with `output_router_logits`: every collective equals the counted calls and bytes, among
    them the tp all-reduces of the latent column-wise inputs (`q_lora_rank`, `kv_lora_rank`
    wide, not the hidden size) and of the shared rotary key's gradient, CP's K/V of every query
    head padded to one width, the batch check over every rank, and the lm head gathered again
    for the router logits' late pre-backward hooks (DeepSeek-V3 returns no aux loss, so no
    aux-loss statistics)."""
    spec = HFSpec(
        family="deepseek_v3", steps=1, seq_len=16, overrides=(("output_router_logits", True),)
    )
    pipeline = Pipeline(
        (TensorParallel(), ContextParallel(), ActivationCheckpoint(mode="full"), FSDP())
    )
    degrees = MeshDegrees(cp=2, tp=2)
    p = predict(
        build_model(spec), degrees, pipeline, seq=spec.seq_len, micro_batch=spec.rows_per_rank
    )
    want = predicted_comm(p.comm)
    assert "aux_all_gather[cp]" not in want and "cp_guard_all_reduce[world]" in want
    for rank, g in enumerate(pool4.run(hf_measure_step, spec, pipeline, degrees)):
        assert_counted_as_predicted(g["comm"], p.comm, rank)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_activations_match_the_meter_in_one_process(family: str):
    """Without expert parallelism nothing depends on the routing drawn: one process, every
    checkpointing mode, within 1% of the meter."""
    spec = HFSpec(family=family, steps=1)
    for mode in ("none", "full", "router", "selective"):
        ac = () if mode == "none" else (ActivationCheckpoint(mode=mode),)
        p = predict(
            build_model(spec), MeshDegrees(), Pipeline(ac), seq=spec.seq_len,
            micro_batch=spec.rows_per_rank,
        )  # fmt: skip
        real = hf_one_process_activations(spec, Pipeline(ac))
        print(f"{family} {mode}: predicted {p.activations}, measured {real}")
        assert abs(p.activations - real) <= 0.01 * real, (mode, p.activations, real)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_top_candidate_trains_like_one_process(pool4: RankPool, family: str):
    """`autoplan` of a tiny HF model for 4 ranks (EP, AC, FSDP; CP needs HF's shifted labels
    and sharded positions, which the rank body does not feed) and a budget that splits the
    candidates: the top candidate, applied on 4 gloo ranks, trains like the one-process HF
    model (loss and every gradient each step, parameters after 2 AdamW steps)."""
    spec = HFSpec(family=family, steps=2)
    model = build_model(spec)
    plan = {
        "world": 4, "seq": spec.seq_len, "micro_batch": spec.rows_per_rank,
        "passes_allowed": ("ep", "ac", "fsdp"),
    }  # fmt: skip
    everything = autoplan(model, memory_per_rank=2**30, **plan)
    memory = sorted(c.prediction.memory for c in everything.fits)
    budget = memory[len(memory) // 2]  # about half the candidates fit
    result = autoplan(model, memory_per_rank=budget, **plan)
    assert result.fits and result.misses and not result.refused, str(result)
    best = result.best
    print(f"{family}: {best}")
    assert best.prediction.memory <= budget
    d = best.degrees
    results = pool4.run(hf_rank_train, spec, best.pipeline, d)
    assert_training_parity(spec, results, d.dp_replicate * d.dp_shard)


def test_hf_model_untouched_by_planning():
    """Planning reads shapes and traces a meta copy: the user's HF model is not changed."""
    model = build_model(HFSpec(family="qwen3_moe", steps=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predict(model, MeshDegrees(dp_shard=4, ep=2), ExpertParallel() | FSDP(), seq=8)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and after[k].device.type == "cpu" for k in before)
