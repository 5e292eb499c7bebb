"""`plan`: per-rank bytes equal what real gloo ranks hold; DeepSeek-V3 at 256 ranks in seconds."""

from __future__ import annotations

import time

import attrs
import pytest
import torch
import torch.distributed as dist

from moetx import (
    FSDP,
    ActivationCheckpoint,
    ContextParallel,
    ExpertDivisibilityError,
    ExpertParallel,
    MeshDegrees,
    MeshError,
    Pipeline,
    PipelineOrderError,
)
from moetx.models import MoEConfig, MoETransformer
from moetx.planning.plan import Plan, RankBytes, plan
from moetx.testing import RankPool
from moetx.testing.train import TrainSpec, build_model
from tests.bodies.plan import gathered_after_forward, held_bytes, plan_here

# Odd sizes on purpose: vocab 67, hidden 12 and widths 6/10 split unevenly over 2 and 4 ranks.
UNEVEN = MoEConfig(
    vocab_size=67,
    hidden_size=12,
    num_heads=2,
    num_kv_heads=1,
    num_layers=3,
    num_dense_layers=1,
    num_experts=4,
    top_k=2,
    expert_hidden_size=6,
    num_shared_experts=1,
    dense_hidden_size=10,
    num_mtp_layers=1,
    routing_bias=True,
)
SPEC = TrainSpec(config=UNEVEN, steps=1)
EP_FSDP = ExpertParallel() | FSDP()

CASES_2 = [
    pytest.param(FSDP(), MeshDegrees(dp_shard=2), SPEC, id="fsdp"),
    pytest.param(EP_FSDP, MeshDegrees(dp_shard=2, ep=2), SPEC, id="ep2-fsdp"),
    pytest.param(
        ExpertParallel() | ActivationCheckpoint() | FSDP(reshard_after_forward=False),
        MeshDegrees(dp_shard=2, ep=2),
        attrs.evolve(SPEC, frozen=("model.embed_tokens",)),
        id="ep2-ac-fsdp-noreshard-frozen",
    ),
]
CASES_4 = [
    pytest.param(FSDP(), MeshDegrees(dp_shard=4), SPEC, id="fsdp"),
    pytest.param(EP_FSDP, MeshDegrees(dp_shard=4, ep=2), SPEC, id="ep2-fsdp"),
    pytest.param(EP_FSDP, MeshDegrees(dp_shard=4, ep=4), SPEC, id="ep4-fsdp"),
    pytest.param(FSDP(), MeshDegrees(dp_replicate=2, dp_shard=2), SPEC, id="hsdp"),
    pytest.param(EP_FSDP, MeshDegrees(dp_replicate=2, dp_shard=2, ep=2), SPEC, id="hsdp-ep2"),
    pytest.param(ExpertParallel(), MeshDegrees(dp_shard=4, ep=4), SPEC, id="ep4-only"),
    pytest.param(
        ContextParallel() | ExpertParallel() | ActivationCheckpoint() | FSDP(),
        MeshDegrees(dp_shard=2, cp=2, ep=2),
        attrs.evolve(SPEC, config=attrs.evolve(UNEVEN, num_mtp_layers=0)),  # CP refuses MTP
        id="cp2-ep2-ac-fsdp",
    ),
    pytest.param(  # 3 local experts over 2 expert-FSDP ranks: experts shard on dim 1
        EP_FSDP,
        MeshDegrees(dp_shard=4, ep=2),
        attrs.evolve(SPEC, config=attrs.evolve(UNEVEN, num_experts=6)),
        id="ep2-fsdp-dim1",
    ),
]


def _check_against_ranks(
    pool: RankPool, pipeline: Pipeline, degrees: MeshDegrees, spec: TrainSpec
) -> None:
    held = pool.run(held_bytes, spec, pipeline, degrees)
    p = plan(pipeline, build_model(spec, meta=True), degrees)
    for rank, real in enumerate(held):
        want = RankBytes(real["params"], real["grads"], real["optimizer"])
        assert p.ranks[rank] == want, f"rank {rank}: plan {p.ranks[rank]} != real {want}"
    for g in p.groups:  # rank 0's local shapes, as the table shows them
        names = [n for n, s in held[0]["shapes"].items() if _matches(g.pattern, n)]
        assert names and all(held[0]["shapes"][n] == g.local_shape for n in names), g


def _matches(pattern: str, name: str) -> bool:
    parts, got = pattern.split("."), name.split(".")
    return len(parts) == len(got) and all(a in ("*", b) for a, b in zip(parts, got, strict=True))


@pytest.mark.parametrize(("pipeline", "degrees", "spec"), CASES_2)
def test_bytes_equal_real_ranks_2(
    pool2: RankPool, pipeline: Pipeline, degrees: MeshDegrees, spec: TrainSpec
) -> None:
    """Per-rank parameter, gradient and AdamW bytes equal what 2 gloo ranks hold, exactly."""
    _check_against_ranks(pool2, pipeline, degrees, spec)


@pytest.mark.parametrize(("pipeline", "degrees", "spec"), CASES_4)
def test_bytes_equal_real_ranks_4(
    pool4: RankPool, pipeline: Pipeline, degrees: MeshDegrees, spec: TrainSpec
) -> None:
    """Per-rank bytes equal what 4 gloo ranks hold, exactly, on every mesh shape."""
    _check_against_ranks(pool4, pipeline, degrees, spec)


@pytest.mark.parametrize(
    "fsdp",
    [FSDP(reshard_after_forward=False), FSDP(reshard_after_forward=False, param_dtype="bfloat16")],
    ids=["fp32", "bf16"],
)
def test_resident_after_forward_equals_real_gathered_bytes(pool2: RankPool, fsdp: FSDP) -> None:
    """The warning's extra bytes are the all-gather buffers FSDP2 really keeps after forward."""
    spec = TrainSpec(config=MoEConfig(num_experts=4, num_shared_experts=1), steps=1)
    degrees = MeshDegrees(dp_shard=2, ep=2)
    pipeline = ExpertParallel() | fsdp
    real = pool2.run(gathered_after_forward, spec, pipeline, degrees)
    p = plan(pipeline, spec.config, degrees)
    assert real == [p.resident_after_forward] * 2
    assert 0 < p.resident_experts_after_forward < p.resident_after_forward


def test_resident_after_forward_with_an_int_reshard_size(pool4: RankPool) -> None:
    """`reshard_after_forward=2` keeps half of each dense unit; experts (2 ranks each) nothing."""
    spec = TrainSpec(config=MoEConfig(num_experts=4, num_shared_experts=1), steps=1)
    degrees = MeshDegrees(dp_shard=4, ep=2)
    pipeline = ExpertParallel() | FSDP(reshard_after_forward=2)
    real = pool4.run(gathered_after_forward, spec, pipeline, degrees)
    p = plan(pipeline, spec.config, degrees)
    assert real == [p.resident_after_forward] * 4
    assert p.resident_after_forward > 0 and p.resident_experts_after_forward == 0
    assert "sharded over 2 ranks" in p.warnings[0]


def test_plan_in_a_real_process_group_runs_no_collective(pool2: RankPool) -> None:
    """With the ranks' own mesh, rank 0 plans alone (a collective would hang) and agrees."""
    degrees = MeshDegrees(dp_shard=2, ep=2)
    alone = pool2.run(plan_here, SPEC, EP_FSDP, degrees, use_mesh=True, only_rank0=True)
    together = pool2.run(plan_here, SPEC, EP_FSDP, degrees, use_mesh=False, only_rank0=False)
    fake = plan(EP_FSDP, build_model(SPEC, meta=True), degrees)
    assert (
        alone[0]
        == together[0]
        == together[1]
        == [(r.params, r.grads, r.optimizer) for r in fake.ranks]
    )


def test_degrees_must_match_a_real_process_group(pool2: RankPool) -> None:
    """Inside a process group of 2, degrees for 4 ranks raise MeshError on every rank."""
    from moetx.testing import RankError

    with pytest.raises(RankError) as info:
        pool2.run(
            plan_here, SPEC, FSDP(), MeshDegrees(dp_shard=4), use_mesh=False, only_rank0=False
        )
    assert all(isinstance(e, MeshError) for e in info.value.exceptions.values())
    assert "must equal the initialised process group's (2)" in str(info.value.exceptions[0])


def test_deepseek_v3_at_256_ranks() -> None:
    """The 685B DeepSeek-V3-shaped model plans at world 256, ep 64 with exact totals (how long
    it takes is measured in `benchmarks/plan_time.py`; printed here, not asserted)."""
    config = MoEConfig.deepseek_v3_shaped()
    start = time.perf_counter()
    p = plan(
        ExpertParallel() | ActivationCheckpoint() | FSDP(), config, MeshDegrees.resolve(256, ep=64)
    )
    elapsed = time.perf_counter() - start
    print(f"DeepSeek-V3 plan at world 256: {elapsed:.2f} s")
    with torch.device("meta"):
        count = sum(q.numel() for q in MoETransformer(config).parameters())
    assert p.num_parameters == count > 680e9
    # Everything splits evenly over 256 ranks (256 experts = 64 ep ranks x 4 ep_shard ranks).
    assert p.bytes.params * 256 == count * 2  # bfloat16
    assert p.bytes == RankBytes(p.bytes.params, p.bytes.params, 2 * p.bytes.params)
    assert len(set(p.ranks)) == 1
    (experts,) = [g for g in p.groups if g.pattern == "model.layers.*.mlp.experts.gate_up_proj"]
    assert experts.count == 58 and experts.passes == ("ep", "ac", "fsdp")
    assert experts.mesh_axes == ("ep_shard", "ep") and experts.mesh_shape == (4, 64)
    assert experts.local_shape == (1, 4096, 7168)  # 256/64 = 4 experts per ep rank, / 4 ep_shard
    assert not p.warnings and "planned in" in str(p)


def test_deepseek_v3_expert_parallel_alone_holds_four_experts_per_rank() -> None:
    """Without FSDP each ep rank holds 256/64 = 4 whole experts of each MoE layer."""
    p = plan(ExpertParallel(), MoEConfig.deepseek_v3_shaped(), MeshDegrees.resolve(256, ep=64))
    (experts,) = [g for g in p.groups if g.pattern == "model.layers.*.mlp.experts.down_proj"]
    assert experts.local_shape == (4, 7168, 2048) and experts.mesh_axes == ("ep",)
    assert experts.bytes.params == 58 * 4 * 7168 * 2048 * 2


def test_reshard_after_forward_false_warns_with_the_extra_bytes() -> None:
    """`reshard_after_forward=False` adds a warning line with the experts' resident bytes."""
    config = MoEConfig(num_experts=8, expert_hidden_size=8, hidden_size=16, num_layers=2)
    degrees = MeshDegrees(dp_shard=4, ep=2)
    quiet = plan(ExpertParallel() | FSDP(reshard_after_forward=True), config, degrees)
    loud = plan(ExpertParallel() | FSDP(reshard_after_forward=False), config, degrees)
    assert not quiet.warnings and quiet.resident_after_forward == 0
    experts = 2 * (8 // 2) * (2 * 8 * 16 + 16 * 8) * 4  # layers x local experts x numel x fp32
    assert loud.resident_experts_after_forward == experts
    text = str(loud)
    assert "WARNING: `FSDP(reshard_after_forward=False)`" in text
    assert "routed experts +12.00 KiB" in text and "WARNING" in loud._repr_markdown_()
    assert loud.ranks == quiet.ranks  # sharded state is the same; only the peak grows


def test_plan_leaves_no_process_group_and_never_touches_the_model() -> None:
    """After a plan (and after a failing one) no process group remains; the model is unchanged."""
    model = build_model(SPEC)
    before = {n: q.clone() for n, q in model.state_dict().items()}
    p = plan(EP_FSDP, model, MeshDegrees(dp_shard=4, ep=2))
    assert isinstance(p, Plan) and p.model == "MoETransformer"
    assert not dist.is_initialized()
    with pytest.raises(ExpertDivisibilityError):
        plan(EP_FSDP, model, MeshDegrees(dp_shard=3, ep=3))
    assert not dist.is_initialized()
    assert all(torch.equal(before[n], q) for n, q in model.state_dict().items())
    assert not any(q.is_meta for q in model.parameters())


def test_bad_degrees_and_rank_raise_mesh_error() -> None:
    """Degrees that do not fit and a rank outside the world are MeshErrors."""
    with pytest.raises(MeshError, match=r"`ep` \(3\) must divide"):
        plan(FSDP(), UNEVEN, MeshDegrees(dp_shard=4, ep=3))
    with pytest.raises(MeshError, match=r"`rank` \(4\) must be in \[0, 4\)"):
        plan(FSDP(), UNEVEN, MeshDegrees(dp_shard=4), rank=4)
    assert not dist.is_initialized()


def test_a_wrong_order_cannot_even_be_planned() -> None:
    """The pipeline is checked where it is written, before any plan."""
    with pytest.raises(PipelineOrderError, match="`FSDP` must come after `ExpertParallel`"):
        plan(FSDP() | ExpertParallel(), UNEVEN, MeshDegrees(dp_shard=2, ep=2))


def test_table_and_fields() -> None:
    """The text and markdown tables name every group; rank choice changes only local shapes."""
    p0 = plan(FSDP(), UNEVEN, MeshDegrees(dp_shard=4))
    p3 = plan(FSDP(), UNEVEN, MeshDegrees(dp_shard=4), rank=3)
    assert p0.ranks == p3.ranks and p0.bytes != p3.bytes  # vocab 67 splits 17/17/17/16
    (embed,) = [g for g in p3.groups if g.pattern == "model.embed_tokens.weight"]
    assert embed.local_shape == (16, 12) and embed.mesh_axes == ("dp_shard_cp",)
    for text in (str(p0), p0._repr_markdown_()):
        assert all(g.pattern in text for g in p0.groups)
        assert "model.layers.*.self_attn.q_proj.weight" in text
    assert p0.max_rank_bytes == p0.bytes.total > p3.bytes.total


def test_cli_prints_the_table_and_the_time(capsys: pytest.CaptureFixture[str]) -> None:
    """`moetx plan` prints the table, the warning and the time; a bad pipeline exits 2."""
    from moetx.__main__ import main

    argv = ["plan", "--model", "tiny", "--world", "4", "--ep", "2", "--pipeline", "ep|ac|fsdp"]
    assert main([*argv, "--reshard-after-forward", "false"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.*.mlp.experts.gate_up_proj" in out and "ep_shard=2 × ep=2" in out
    assert "WARNING: `FSDP(reshard_after_forward=False)`" in out and "moetx plan took" in out
    assert main(["plan", "--pipeline", "fsdp|ep"]) == 2
    assert "PipelineOrderError" in capsys.readouterr().err


def test_passes_column_names_what_each_pass_touched() -> None:
    """cp marks attention, ep the routed experts, ac checkpointed blocks, fsdp everything."""
    config = attrs.evolve(UNEVEN, num_mtp_layers=0)
    pipeline = ContextParallel() | ExpertParallel() | ActivationCheckpoint(every=2) | FSDP()
    p = plan(pipeline, config, MeshDegrees(dp_shard=2, cp=2, ep=2))
    passes = {(g.pattern, g.passes) for g in p.groups}
    assert ("model.layers.*.self_attn.q_proj.weight", ("cp", "fsdp")) in passes  # blocks 1, 3
    assert ("model.layers.*.self_attn.q_proj.weight", ("cp", "ac", "fsdp")) in passes  # block 2
    assert ("model.layers.*.mlp.experts.down_proj", ("ep", "ac", "fsdp")) in passes
    assert ("model.embed_tokens.weight", ("fsdp",)) in passes
