"""`FSDP(reshard_after_forward="auto")`, the default: each unit gathered once per step when it fits.

Issue 17: with `True` every unit was all-gathered twice per step (forward and again in backward).
"auto" keeps the root and, in backward order, every unit whose gathered parameters fit the rank's
sharded training state; the plan reports the bytes, and real ranks hold exactly them.
"""

from __future__ import annotations

import attrs
import pytest

from moetx import FSDP, ActivationCheckpoint, ExpertParallel, MeshDegrees, PassOptionError, Pipeline
from moetx.models import MoEConfig
from moetx.planning.plan import plan
from moetx.testing import RankPool
from moetx.testing.train import TrainSpec, assert_training_parity, build_model, rank_train
from tests.bodies.anatomy import step_collectives
from tests.bodies.plan import gathered_after_forward

# Issue 17's workload shape (4 layers, 8 experts top-2, hidden 64), with short sequences.
WORKLOAD = TrainSpec(
    config=MoEConfig(
        vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
        num_experts=8, top_k=2, expert_hidden_size=64,
    ),
    rows_per_rank=2, seq_len=16, steps=1,
)  # fmt: skip
SMALL = MoEConfig(num_experts=4, num_shared_experts=1)
# On 4 ranks the frozen parameters shrink the budget (no gradients, no AdamW state): "auto"
# keeps 3 of the 4 units gathered (the 2 small blocks share one) and reshards the other.
PARTIAL = TrainSpec(config=SMALL, frozen=("model.layers.1", "lm_head"))
# Issue 17's policy (the default) with the small units merged (blocks grouped, embedding and
# lm head in the root).
AUTO = FSDP(reshard_after_forward="auto", min_unit_bytes=1 << 20)


def test_auto_is_the_default_and_every_value_round_trips() -> None:
    """`FSDP()` means "auto" (the planner models it); True, the unit grouping and the ints are
    values of their own; all round-trip."""
    assert FSDP().reshard_after_forward == "auto" and FSDP().min_unit_bytes == 0
    assert FSDP(reshard_after_forward="auto") == FSDP()
    assert repr(AUTO) == "FSDP(min_unit_bytes=1048576)"
    assert repr(FSDP(reshard_after_forward=True)) == "FSDP(reshard_after_forward=True)"
    for p in (FSDP(), AUTO, FSDP(reshard_after_forward=2), FSDP(reshard_after_forward=True)):
        assert eval(repr(p), {"FSDP": FSDP}) == p
    assert (
        len({FSDP(), AUTO, FSDP(reshard_after_forward=False), FSDP(reshard_after_forward=True)})
        == 4
    )
    assert Pipeline.parse("fsdp(reshard_after_forward='auto', min_unit_bytes=1048576)") == Pipeline(
        [AUTO]
    )
    assert Pipeline.parse("fsdp(reshard_after_forward=True)") == Pipeline(
        [FSDP(reshard_after_forward=True)]
    )


def test_a_misspelt_auto_is_refused_with_the_spelling() -> None:
    """Any other string is refused; "Auto" says how to write it."""
    with pytest.raises(
        PassOptionError,
        match=r"^`FSDP\.reshard_after_forward` \('Auto'\) must be True, False or an int >= 2 "
        r"\(the size of the group to reshard to after forward\), or 'auto' \(keep units "
        r"gathered while they fit the rank's sharded training state\)\. Write 'auto' in lower "
        r"case\.",
    ):
        FSDP(reshard_after_forward="Auto")


@pytest.mark.parametrize(
    ("fsdp", "expected"),
    [
        # 2 dense units (the 4 small blocks in one; the root, which the small embedding and lm
        # head join); the experts sit on 1-rank meshes
        (AUTO, {"all_gather": 2, "reduce_scatter": 2, "all_to_all": 16, "all_to_all int64": 4}),
        (
            FSDP(reshard_after_forward=True, min_unit_bytes=1 << 20),
            {"all_gather": 4, "reduce_scatter": 2, "all_to_all": 16, "all_to_all int64": 4},
        ),
        # blocks in pairs (51,712 bytes each): 3 dense units
        (
            FSDP(reshard_after_forward="auto", min_unit_bytes=65537),
            {"all_gather": 3, "reduce_scatter": 3, "all_to_all": 16, "all_to_all int64": 4},
        ),
        # every block its own unit (the default): 5 dense units
        (
            FSDP(reshard_after_forward="auto", min_unit_bytes=0),
            {"all_gather": 7, "reduce_scatter": 7, "all_to_all": 16, "all_to_all int64": 4},
        ),
        # before issue 17: embedding and lm head units of their own, resharded after forward
        (
            FSDP(reshard_after_forward=True, min_unit_bytes=0),
            {"all_gather": 14, "reduce_scatter": 7, "all_to_all": 16, "all_to_all int64": 4},
        ),
    ],
    ids=["auto", "true", "auto-pairs", "auto-ungrouped", "true-ungrouped"],
)
def test_auto_gathers_each_unit_once_per_step_on_2_ranks(
    pool2: RankPool, fsdp: FSDP, expected: dict[str, int]
) -> None:
    """EP | FSDP on 2 ranks: 24 collectives per step with 1 MiB units, 34 without, 41 before
    issue 17."""
    degrees = MeshDegrees(dp_shard=2, ep=2)
    counts = pool2.run(step_collectives, WORKLOAD, ExpertParallel() | fsdp, degrees)
    assert counts == [expected] * 2


def test_auto_gathers_each_unit_once_per_step_on_4_ranks(pool4: RankPool) -> None:
    """ep_shard 2: the 4 expert units all-gather too; 6 all-gathers per step instead of 12."""
    degrees = MeshDegrees(dp_shard=4, ep=2)
    auto, true = (
        pool4.run(step_collectives, WORKLOAD, ExpertParallel() | fsdp, degrees)[0]
        for fsdp in (AUTO, FSDP(reshard_after_forward=True, min_unit_bytes=1 << 20))
    )
    assert (auto["all_gather"], true["all_gather"]) == (6, 12)
    assert auto["reduce_scatter"] == true["reduce_scatter"] == 6
    assert sum(auto.values()) == sum(true.values()) - 6 == 32


@pytest.mark.parametrize(
    ("world", "spec", "degrees", "kept"),
    [
        (2, TrainSpec(config=SMALL, steps=1), MeshDegrees(dp_shard=2, ep=2), "4 of 4"),
        (4, PARTIAL, MeshDegrees(dp_shard=4, ep=2), "3 of 4"),
    ],
    ids=["all-kept", "partly-kept"],
)
def test_plan_reports_the_bytes_real_ranks_keep_gathered(
    request: pytest.FixtureRequest, world: int, spec: TrainSpec, degrees: MeshDegrees, kept: str
) -> None:
    """The plan's `resident_after_forward` under "auto" is the all-gather buffers FSDP2 keeps."""
    pool: RankPool = request.getfixturevalue(f"pool{world}")
    pipeline = ExpertParallel() | AUTO
    real = pool.run(gathered_after_forward, spec, pipeline, degrees)
    p = plan(pipeline, build_model(spec, meta=True), degrees)
    assert real == [p.resident_after_forward] * world
    assert 0 < p.resident_experts_after_forward < p.resident_after_forward
    assert not p.warnings
    assert f"note: `reshard_after_forward='auto'` keeps {kept} FSDP units" in str(p)
    everything = plan(ExpertParallel() | FSDP(reshard_after_forward=False), SMALL, degrees)
    assert p.resident_after_forward <= everything.resident_after_forward


def test_partly_kept_units_train_like_one_process(pool4: RankPool) -> None:
    """Units kept and units resharded in one model: 3 AdamW steps match the reference."""
    degrees = MeshDegrees(dp_shard=4, ep=2)
    pipeline = ExpertParallel() | AUTO
    assert_training_parity(pool4.run(rank_train, PARTIAL, pipeline, degrees), PARTIAL, degrees)


@pytest.mark.parametrize(
    "pipeline",
    [
        ExpertParallel() | AUTO,
        ExpertParallel()
        | ActivationCheckpoint()
        | FSDP(reshard_after_forward=True, min_unit_bytes=1 << 20),
        ExpertParallel() | FSDP(reshard_after_forward="auto", min_unit_bytes=65537),
    ],
    ids=["auto-one-group", "ac-true-one-group", "auto-pairs"],
)
def test_grouped_blocks_train_like_one_process(pool2: RankPool, pipeline: Pipeline) -> None:
    """Blocks sharing one FSDP unit (one `fully_shard` over several blocks): loss and every
    gradient match the one-process reference for 2 AdamW steps."""
    spec = attrs.evolve(WORKLOAD, steps=2)
    degrees = MeshDegrees(dp_shard=2, ep=2)
    assert_training_parity(pool2.run(rank_train, spec, pipeline, degrees), spec, degrees)
