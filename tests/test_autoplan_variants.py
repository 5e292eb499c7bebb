"""`autoplan` weighs ring CP and sequence parallelism beside the plain forms, each candidate
predicted as `predict` alone predicts it, and a ring candidate it picks trains like one process."""

from __future__ import annotations

from moetx import ContextParallel, TensorParallel
from moetx.models import MoEConfig
from moetx.planning import autoplan, predict
from moetx.planning.autoplan import PASSES
from moetx.testing import RankPool
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
