"""`FSDP(reshard_after_forward="auto")`, the default: each unit gathered once per step when it fits.

Issue 17: with `True` every unit was all-gathered twice per step (forward and again in backward).
"auto" keeps the root and, in backward order, every unit whose gathered parameters fit the rank's
sharded training state; the plan reports the bytes, and real ranks hold exactly them.
"""

from __future__ import annotations

import itertools

import attrs
import pytest

from moetx import (
    FSDP,
    ActivationCheckpoint,
    Compile,
    ExpertParallel,
    MeshDegrees,
    PassOptionError,
    Pipeline,
)
from moetx.models import MoEConfig
from moetx.planning.plan import plan
from moetx.planning.predict import predict
from moetx.planning.predict_fsdp import fsdp_units
from moetx.planning.predict_state import ModelShapes
from moetx.testing import RankPool
from moetx.testing.train import TrainSpec, assert_training_parity, build_model, rank_train
from tests.bodies.anatomy import step_collectives
from tests.bodies.compile import compiled_train
from tests.bodies.fsdp import prefetch_targets
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
# Issue 17's policy, the default: "auto", the small units merged (blocks grouped, embedding and
# lm head in the root: `min_unit_bytes=1 << 20`), each unit prefetching the next.
AUTO = FSDP(reshard_after_forward="auto", min_unit_bytes=1 << 20, prefetch=1)
# One unit per block, embedding and lm head units of their own (the default before issue 17).
PER_BLOCK = FSDP(min_unit_bytes=0)


def test_auto_is_the_default_and_every_value_round_trips() -> None:
    """`FSDP()` means "auto" with 1 MiB units and prefetch 1 (the planner models it);
    True, per-block units, prefetch and the ints are values of their own; all round-trip."""
    assert (FSDP().reshard_after_forward, FSDP().min_unit_bytes, FSDP().prefetch) == (
        "auto",
        1 << 20,
        1,
    )
    assert FSDP() == AUTO and repr(AUTO) == "FSDP()"
    assert repr(PER_BLOCK) == "FSDP(min_unit_bytes=0)"
    assert repr(FSDP(prefetch=0)) == "FSDP(prefetch=0)"
    assert repr(FSDP(reshard_after_forward=True)) == "FSDP(reshard_after_forward=True)"
    values = (
        FSDP(),
        PER_BLOCK,
        FSDP(prefetch=0),
        FSDP(reshard_after_forward=2),
        FSDP(reshard_after_forward=True),
    )
    for p in values:
        assert eval(repr(p), {"FSDP": FSDP}) == p
    assert len(set(values)) == 5
    assert Pipeline.parse("fsdp(reshard_after_forward='auto', min_unit_bytes=1048576)") == Pipeline(
        [FSDP()]
    )
    assert Pipeline.parse("fsdp(min_unit_bytes=0, prefetch=2)") == Pipeline(
        [FSDP(min_unit_bytes=0, prefetch=2)]
    )
    assert Pipeline.parse("fsdp(reshard_after_forward=True)") == Pipeline(
        [FSDP(reshard_after_forward=True)]
    )


def test_a_negative_prefetch_is_refused() -> None:
    """`prefetch` counts units ahead: an int >= 0."""
    with pytest.raises(PassOptionError, match=r"^`FSDP\.prefetch` \(-1\) must be"):
        FSDP(prefetch=-1)


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
        # the default: 2 dense units (the 4 small blocks in one; the root, which the small
        # embedding and lm head join); the experts sit on 1-rank meshes
        (AUTO, {"all_gather": 2, "reduce_scatter": 2, "all_to_all": 16, "all_to_all int64": 4}),
        # explicit prefetch moves all-gathers earlier, it adds none
        (
            FSDP(prefetch=0),
            {"all_gather": 2, "reduce_scatter": 2, "all_to_all": 16, "all_to_all int64": 4},
        ),
        (
            FSDP(prefetch=2),
            {"all_gather": 2, "reduce_scatter": 2, "all_to_all": 16, "all_to_all int64": 4},
        ),
        (
            FSDP(reshard_after_forward=True, min_unit_bytes=1 << 20),
            {"all_gather": 4, "reduce_scatter": 2, "all_to_all": 16, "all_to_all int64": 4},
        ),
        # blocks in pairs (51,712 bytes each): 3 dense units
        (
            FSDP(reshard_after_forward="auto", min_unit_bytes=65537),
            {"all_gather": 3, "reduce_scatter": 3, "all_to_all": 16, "all_to_all int64": 4},
        ),
        # every block its own unit (`min_unit_bytes=0`, the default before): 7 dense units
        (
            PER_BLOCK,
            {"all_gather": 7, "reduce_scatter": 7, "all_to_all": 16, "all_to_all int64": 4},
        ),
        # before issue 17: embedding and lm head units of their own, resharded after forward
        (
            FSDP(reshard_after_forward=True, min_unit_bytes=0),
            {"all_gather": 14, "reduce_scatter": 7, "all_to_all": 16, "all_to_all int64": 4},
        ),
        (
            FSDP(reshard_after_forward=True, min_unit_bytes=0, prefetch=0),
            {"all_gather": 14, "reduce_scatter": 7, "all_to_all": 16, "all_to_all int64": 4},
        ),
    ],
    ids=[
        "default",
        "no-prefetch",
        "prefetch2",
        "true",
        "auto-pairs",
        "auto-ungrouped",
        "true-ungrouped",
        "true-ungrouped-no-prefetch",
    ],
)
def test_auto_gathers_each_unit_once_per_step_on_2_ranks(
    pool2: RankPool, fsdp: FSDP, expected: dict[str, int]
) -> None:
    """EP | FSDP on 2 ranks: 24 collectives per step with the default (1 MiB units), 34 with a
    unit per block, 41 before issue 17; `predict` counts the same FSDP collectives."""
    degrees = MeshDegrees(dp_shard=2, ep=2)
    pipeline = ExpertParallel() | fsdp
    counts = pool2.run(step_collectives, WORKLOAD, pipeline, degrees)
    assert counts == [expected] * 2
    p = predict(WORKLOAD.config, degrees, pipeline, seq=WORKLOAD.seq_len, micro_batch=2)
    fsdp_calls = {t.kind.removeprefix("fsdp_"): t.calls for t in p.comm if "fsdp" in t.kind}
    assert fsdp_calls == {k: expected[k] for k in ("all_gather", "reduce_scatter")}
    assert sum(expected.values()) < 30 or fsdp.min_unit_bytes < 1 << 20


def test_auto_gathers_each_unit_once_per_step_on_4_ranks(pool4: RankPool) -> None:
    """ep_shard 2: the 4 expert units all-gather too; 6 all-gathers per step instead of 12."""
    degrees = MeshDegrees(dp_shard=4, ep=2)
    auto, true, prefetched, per_block = (
        pool4.run(step_collectives, WORKLOAD, ExpertParallel() | fsdp, degrees)[0]
        for fsdp in (
            AUTO,
            FSDP(reshard_after_forward=True, min_unit_bytes=1 << 20),
            FSDP(prefetch=0),
            PER_BLOCK,
        )
    )
    assert (auto["all_gather"], true["all_gather"]) == (6, 12)
    assert auto["reduce_scatter"] == true["reduce_scatter"] == 6
    assert sum(auto.values()) == sum(true.values()) - 6 == 32
    assert prefetched == auto
    assert sum(per_block.values()) == 42


# Two MoE blocks, no dense one: the second block's experts are resharded after their backward
# before the first block's forward is recomputed (WORKLOAD's default units keep them gathered).
TWO_MOE_BLOCKS = TrainSpec(
    config=MoEConfig(
        vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
        num_experts=8, top_k=3, expert_hidden_size=8, num_shared_experts=1,
        num_dense_layers=0, dense_hidden_size=32,
    ),
    steps=2, rows_per_rank=2, seq_len=6,
)  # fmt: skip


@pytest.mark.parametrize("mode", ["router", "full", "selective"])
def test_recomputed_forward_prefetches_nothing_again(pool4: RankPool, mode: str) -> None:
    """Under `ActivationCheckpoint`, backward re-runs each block's forward; a routed-experts unit
    nested in a block must not start its forward prefetch again there (it would gather the next
    block's experts, already resharded after their backward, a second time). Prefetch moves
    collectives, never adds one: counts equal `prefetch=0`'s and `predict`'s."""
    degrees = MeshDegrees(dp_shard=4, ep=2)
    on, off = (
        pool4.run(
            step_collectives,
            TWO_MOE_BLOCKS,
            ExpertParallel() | ActivationCheckpoint(mode=mode) | FSDP(prefetch=n),
            degrees,
        )[0]
        for n in (1, 0)
    )
    assert on == off
    pipeline = ExpertParallel() | ActivationCheckpoint(mode=mode) | FSDP()
    p = predict(TWO_MOE_BLOCKS.config, degrees, pipeline, seq=6, micro_batch=2)
    fsdp_calls = {
        k: sum(t.calls for t in p.comm if t.kind == f"fsdp_{k}")
        for k in ("all_gather", "reduce_scatter")
    }
    assert fsdp_calls == {k: on[k] for k in fsdp_calls}


@pytest.mark.parametrize("prefetch", [1, 2])
def test_an_aux_loss_output_gathers_the_lm_head_no_more(pool2: RankPool, prefetch: int) -> None:
    """FSDP2's root pre-backward hook runs once per output tensor that gets a gradient; an
    aux-loss output's gradient arrives after the lm head's backward resharded it, and an explicit
    root prefetch then gathered the lm head a third time per step (and left it gathered). The
    root prefetches by FSDP2's default (once): with an aux loss the counts equal `prefetch=0`'s
    and `predict`'s (lm head, embedding and every block their own unit)."""
    spec = attrs.evolve(
        TWO_MOE_BLOCKS, config=attrs.evolve(TWO_MOE_BLOCKS.config, aux_loss_coef=0.01)
    )
    degrees = MeshDegrees(dp_shard=2)
    on, off = (
        pool2.run(
            step_collectives,
            spec,
            Pipeline([FSDP(prefetch=n, min_unit_bytes=0, reshard_after_forward=True)]),
            degrees,
        )[0]
        for n in (prefetch, 0)
    )
    assert on == off
    pipeline = Pipeline([FSDP(min_unit_bytes=0, reshard_after_forward=True)])
    p = predict(spec.config, degrees, pipeline, seq=spec.seq_len, micro_batch=spec.rows_per_rank)
    units = fsdp_units(ModelShapes.of(spec.config), degrees, pipeline)
    assert {u.name for u in units} >= {"lm_head", "embedding"}, units
    gathers = sum(t.calls for t in p.comm if t.kind == "fsdp_all_gather")
    assert on["all_gather"] == gathers == 2 * sum(u.count for u in units if u.mesh_size > 1)


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


GROUPED = [
    ExpertParallel() | AUTO,
    ExpertParallel() | FSDP(prefetch=0),
    ExpertParallel() | ActivationCheckpoint() | FSDP(prefetch=2),
    ExpertParallel() | ActivationCheckpoint() | FSDP(reshard_after_forward=True, prefetch=1),
    ExpertParallel() | FSDP(reshard_after_forward="auto", min_unit_bytes=65537),
    ExpertParallel() | FSDP(reshard_after_forward=True, min_unit_bytes=0, prefetch=1),
]
GROUPED_IDS = [
    "default",
    "no-prefetch",
    "ac-prefetch2",
    "ac-true-prefetch1",
    "auto-pairs",
    "true-per-block-prefetch1",
]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("pipeline", GROUPED, ids=GROUPED_IDS)
def test_grouped_blocks_train_like_one_process(
    request: pytest.FixtureRequest, world: int, pipeline: Pipeline
) -> None:
    """Blocks sharing one FSDP unit (one `fully_shard` over several blocks; the default) and
    explicit prefetch (with and without AC, units kept or resharded): loss and every gradient
    match the one-process reference for 2 AdamW steps, on 2 ranks (experts on 1-rank meshes)
    and 4 (experts all-gathered over ep_shard 2)."""
    if world == 4 and pipeline not in (GROUPED[0], GROUPED[2], GROUPED[3], GROUPED[5]):
        pytest.skip("4 ranks: the default, AC with prefetch, per-block prefetch")
    pool: RankPool = request.getfixturevalue(f"pool{world}")
    spec = attrs.evolve(WORKLOAD, steps=2)
    degrees = MeshDegrees(dp_shard=world, ep=2)
    assert_training_parity(pool.run(rank_train, spec, pipeline, degrees), spec, degrees)


def test_prefetch_follows_forward_and_backward_order(pool4: RankPool) -> None:
    """The default `prefetch=1` on 4 ranks: in forward each top-level unit prefetches the next
    one and the routed-experts units nested in its blocks (on the expert mesh), which prefetch
    nothing themselves; in backward each unit but the root prefetches the next (the experts of
    the last block first; the root keeps FSDP2's own prefetch of one, see
    `test_an_aux_loss_output_gathers_the_lm_head_no_more`); on gloo every all-gather is
    asynchronous.
    With `prefetch=0`, FSDP2's own order (no lists, synchronous)."""
    degrees = MeshDegrees(dp_shard=4, ep=2)
    experts = [f"model.layers.{i}.mlp.experts" for i in range(4)]
    got = pool4.run(prefetch_targets, WORKLOAD, ExpertParallel() | FSDP(), degrees)
    backward = ["", "model.layers.0", *reversed(experts)]
    want = {u: ([], [], True) for u in backward}
    want[""][0].append("model.layers.0")
    want["model.layers.0"][0].extend(experts)  # nested units: started by their block's unit
    for a, b in itertools.pairwise(backward[1:]):  # the root: FSDP2's own (once per backward)
        want[a][1].append(b)
    assert got == [want] * 4
    plain = pool4.run(prefetch_targets, WORKLOAD, ExpertParallel() | FSDP(prefetch=0), degrees)
    assert plain == [{u: ([], [], False) for u in backward}] * 4


def test_prefetch_under_compile_trains_like_one_process(pool2: RankPool) -> None:
    """`Compile(fullgraph=True)` drives the nested expert units from each block's hooks; with
    explicit prefetch over per-block units resharded after forward, every loss and gradient
    still matches the one-process model, and every block is one graph without breaks."""
    pipeline = (
        ExpertParallel()
        | Compile(backend="aot_eager", fullgraph=True)
        | FSDP(reshard_after_forward=True, min_unit_bytes=0, prefetch=1)
    )
    spec = attrs.evolve(WORKLOAD, steps=2)
    degrees = MeshDegrees(dp_shard=2, ep=2)
    results = pool2.run(compiled_train, spec, pipeline, degrees)
    assert_training_parity(results, spec, degrees)
    blocks = [f"model.layers.{i}" for i in range(4)]
    assert all(r["graphs"] == {b: (1, 0) for b in blocks} for r in results)


@pytest.mark.parametrize(
    ("fsdp", "note"),
    [
        (
            FSDP(),
            "`FSDP` makes 6 FSDP units (`min_unit_bytes=1048576`: blocks "
            "`model.layers.0`-`model.layers.3` in one unit; `model.embed_tokens` and `lm_head` "
            "join the root unit); each starts the next unit's all-gather (`prefetch=1`).",
        ),
        (
            FSDP(min_unit_bytes=65537, prefetch=0),
            "`FSDP` makes 7 FSDP units (`min_unit_bytes=65537`: blocks "
            "`model.layers.0`-`model.layers.1`, `model.layers.2`-`model.layers.3` each in one "
            "unit; `model.embed_tokens` and `lm_head` join the root unit).",
        ),
        (FSDP(min_unit_bytes=0, prefetch=0), "`FSDP` makes 11 FSDP units."),
    ],
    ids=["default", "pairs", "per-block"],
)
def test_plan_shows_the_units(fsdp: FSDP, note: str) -> None:
    """`plan` says how many units the default (and any `min_unit_bytes`) makes, which modules
    share one and how far each prefetches (the 4 blocks, 4 routed-experts units and the root
    on issue 17's workload at 4 ranks); the count is the planner's too."""
    degrees = MeshDegrees(dp_shard=4, ep=2)
    pipeline = ExpertParallel() | fsdp
    p = plan(pipeline, WORKLOAD.config, degrees)
    assert note in p.notes, p.notes
    units = fsdp_units(ModelShapes.of(build_model(WORKLOAD, meta=True)), degrees, pipeline)
    assert f"makes {sum(u.count for u in units)} FSDP units" in note


def test_prefetch_without_the_root_unit_puts_the_final_norm_after_the_blocks(
    pool2: RankPool,
) -> None:
    """`wrap_root=False`, one unit per block: forward runs the embedding, the blocks, the final
    norm, the lm head; backward the other way; each unit prefetches the next."""
    forward = [
        "model.embed_tokens",
        *(f"model.layers.{i}" for i in range(4)),
        "model.norm",
        "lm_head",
    ]
    fsdp = FSDP(wrap_root=False, min_unit_bytes=0)
    got = pool2.run(prefetch_targets, WORKLOAD, Pipeline([fsdp]), MeshDegrees(dp_shard=2))
    want = {
        u: (forward[i + 1 : i + 2], forward[::-1][forward[::-1].index(u) + 1 :][:1], True)
        for i, u in enumerate(forward)
    }
    assert got == [want] * 2


def test_the_default_leaves_real_size_blocks_their_own_units() -> None:
    """1 MiB is far below a real block: with Qwen3-30B-A3B's shapes (4 of its 48 layers) in
    bf16 compute, each block's dense unit gathers tens of MiB, so the default makes the same
    units as `min_unit_bytes=0`; only toy models merge."""
    qwen = MoEConfig(
        vocab_size=151936, hidden_size=2048, num_layers=4, num_heads=32, num_kv_heads=4,
        head_dim=128, num_experts=128, top_k=8, expert_hidden_size=768,
    )  # fmt: skip
    shapes, degrees = ModelShapes.of(qwen), MeshDegrees(dp_shard=8, ep=8)
    default, per_block = (
        fsdp_units(shapes, degrees, ExpertParallel() | fsdp)
        for fsdp in (FSDP(param_dtype="bfloat16"), FSDP(param_dtype="bfloat16", min_unit_bytes=0))
    )
    assert default == per_block
    blocks = [u for u in default if u.name == "block"]
    assert sum(u.count for u in blocks) == 4
    assert min(u.gathered for u in blocks) > 32 * (1 << 20)
    toy = fsdp_units(ModelShapes.of(WORKLOAD.config), degrees, ExpertParallel() | FSDP())
    assert sum(u.count for u in toy if u.name == "block") == 1
