"""`autoplan` weighs ring CP and sequence parallelism beside the plain forms, each candidate
predicted as `predict` alone predicts it (tensor-parallel traces composed from cheaper ones by
`TraceCache` included), and a ring candidate it picks trains like one process."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from moetx import ActivationCheckpoint, ContextParallel, ExpertParallel, TensorParallel
from moetx.core.errors import MoetxError
from moetx.models import MoEConfig
from moetx.planning import autoplan, predict
from moetx.planning.autoplan import PASSES
from moetx.planning.predict_activations import BlockTrace, ep_trace_degree, trace_blocks
from moetx.planning.predict_state import ModelShapes
from moetx.planning.trace_cache import TraceCache
from moetx.testing import RankPool, examples, nightly_param
from moetx.testing.hf import HFSpec, build_model
from moetx.testing.train import TrainSpec
from tests.test_autoplan import assert_candidate_trains_like_one_process

# Long sequence, few parameters: activations (where ring and all-gather CP differ) dominate.
CONFIG = MoEConfig(
    vocab_size=68, hidden_size=12, num_heads=2, num_kv_heads=2, num_layers=2, num_dense_layers=1,
    num_experts=4, top_k=2, expert_hidden_size=6, num_shared_experts=1, dense_hidden_size=10,
    tie_embeddings=False,
)  # fmt: skip
SEQ, ROWS = 32, 2


def _variants(result) -> set[str]:
    return {
        repr(p)
        for c in result.fits + result.misses
        for p in c.pipeline
        if isinstance(p, ContextParallel | TensorParallel)
    }


def test_every_candidate_is_predicted_as_predict_alone_predicts_it():
    """The planner's trace cache is keyed by every pass that changes what a block keeps: each
    candidate's prediction (ring or all-gather CP, tp with or without sequence parallelism)
    equals a fresh `predict` of its pipeline (before the key held the cp pass, a ring candidate
    reused the all-gather trace)."""
    result = autoplan(
        CONFIG, world=2, memory_per_rank=1 << 30, seq=SEQ, micro_batch=ROWS,
        passes_allowed=PASSES, ac_modes=("none", "selective"),
    )  # fmt: skip
    assert {
        "ContextParallel(comm='p2p')",
        "ContextParallel()",
        "TensorParallel(sequence_parallel=True)",
        "TensorParallel()",
    } <= _variants(result)
    for c in result.fits + result.misses:
        alone = predict(CONFIG, c.degrees, c.pipeline, seq=SEQ, micro_batch=ROWS)
        assert c.prediction == alone, (c.pipeline, c.degrees)


def _outcome(make: Callable[..., BlockTrace], *args: object, **kwargs: object) -> BlockTrace | str:
    """The trace, or the refusal's kind and first line."""
    try:
        return make(*args, **kwargs)
    except MoetxError as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"


def _hf_model(family: str):
    pytest.importorskip("transformers", reason="needs Hugging Face transformers>=5")
    # the tiny Qwen3-MoE has one kv head, which tp 2 refuses
    kv = (("num_key_value_heads", 2),) if family == "qwen3_moe" else ()
    return build_model(HFSpec(family=family, overrides=kv))


@pytest.mark.parametrize(
    "family",
    [
        nightly_param(
            "moetx", why="ci: test_every_candidate_is_predicted_as_predict_alone_predicts_it"
        ),
        nightly_param("qwen3_moe", why="ci composes DeepSeek-V3"),
        "deepseek_v3",
    ],
)
def test_composed_tensor_parallel_traces_equal_traces_made_whole(family: str):
    """`TraceCache` composes a tp trace from the tp = 1 trace with the same dispatcher and the
    tp change measured with the all-to-all one; for every cp form, tp form, dispatcher and
    checkpointing mode (ci: no checkpointing and selective) the result (a trace, or the
    refusal) equals `trace_blocks` on the key whole, on moetx's model and Hugging Face ones."""
    model = CONFIG if family == "moetx" else _hf_model(family)
    seq, rows = (SEQ, ROWS) if family == "moetx" else (8, 2)
    experts = ModelShapes.of(model).num_experts
    cheap = ep_trace_degree(ExpertParallel(), 2, experts)
    cache = TraceCache(model, micro_batch=rows, seq=seq, experts=experts)
    cps = [(None, 1), (ContextParallel(), 2), (ContextParallel(comm="p2p"), 2)]
    tps = [(TensorParallel(), 2), (TensorParallel(sequence_parallel=True), 2)]
    eps = [(None, 1), (ExpertParallel(dispatcher="all_gather"), 2), (ExpertParallel(), cheap)]
    modes = ("router", "selective", "full") if examples(1) >= 5 else ("selective",)  # ci: 1
    acs = [None, *(ActivationCheckpoint(mode=m) for m in modes)]
    traced = 0
    for (cp, cpd), (tp, tpd), (ep, epd), ac in itertools.product(cps, tps, eps, acs):
        got = _outcome(cache, cp, cpd, ac, tp, tpd, ep, epd)
        whole = _outcome(
            trace_blocks, model, micro_batch=rows, seq=seq, ac=ac, cp=cp, cp_degree=cpd, tp=tp,
            tp_degree=tpd, ep=ep, ep_degree=epd,
        )  # fmt: skip
        assert got == whole, (cp, tp, ep, ac)
        traced += isinstance(whole, BlockTrace)
    assert traced and cache.composed, (traced, cache.composed)
    print(
        f"{family}: {traced} traced keys; the cache traced {cache.traced}, composed {cache.composed}"
    )


def test_ring_context_parallel_is_chosen_when_only_it_fits(pool4: RankPool):
    """A budget between the smallest ring-CP and the smallest all-gather-CP candidate at cp=4:
    `autoplan`'s best is ring CP; applied on 4 gloo ranks it trains like one process."""
    kwargs = dict(world=4, seq=SEQ, micro_batch=ROWS, passes_allowed=("cp", "ac", "fsdp"))
    everything = autoplan(CONFIG, memory_per_rank=1 << 30, ac_modes=("none",), **kwargs)

    def smallest(comm: str) -> int:
        return min(
            c.prediction.memory
            for c in everything.fits
            if c.degrees.cp == 4 and any(getattr(p, "comm", None) == comm for p in c.pipeline)
        )

    ring, gathered = smallest("p2p"), smallest("allgather")
    assert ring < gathered
    budget = (ring + gathered) // 2
    result = autoplan(CONFIG, memory_per_rank=budget, ac_modes=("none",), **kwargs)
    best = result.best
    if best.degrees.cp != 4:  # a smaller cp may fit too; the ring one must then be among the fits
        assert any(c.degrees.cp == 4 and "p2p" in repr(c.pipeline) for c in result.fits), (
            result.table()
        )
        best = next(c for c in result.fits if c.degrees.cp == 4)
    assert "ContextParallel(comm='p2p')" in repr(best.pipeline)
    assert not any(c.degrees.cp == 4 and "allgather" in repr(c.pipeline) for c in result.fits)
    spec = TrainSpec(config=CONFIG, steps=2, rows_per_rank=ROWS, seq_len=SEQ, lr=1e-3)
    assert_candidate_trains_like_one_process(pool4, spec, best)
