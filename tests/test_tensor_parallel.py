"""`TensorParallel`: heads, dense MLPs and the vocabulary on `tp`, composed with CP, EP, AC, FSDP.

Proof is numerical: every gradient at every step and the final parameters equal one process
training on the global batch, on meshes where tp is alone, beside data parallelism, and beside
context and expert parallelism.
"""

from __future__ import annotations

import importlib.util
import re

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import init_device_mesh

from moetx import (
    FSDP,
    ActivationCheckpoint,
    ContextParallel,
    ExpertParallel,
    MeshAxisError,
    MeshDegrees,
    ParallelMesh,
    PassAlreadyAppliedError,
    PassPreconditionError,
    Pipeline,
    TensorParallel,
)
from moetx.cli.plan import main as plan_cli
from moetx.models import MoEConfig, MoETransformer
from moetx.passes.tensor_parallel import tp_targets
from moetx.testing import examples, fake_world
from moetx.testing.hf import HFSpec
from moetx.testing.hf import build_model as hf_build_model
from moetx.testing.train import (
    TrainSpec,
    assert_matches_reference,
    assert_training_parity,
    rank_train,
)
from tests.bodies import tensor_parallel as bodies
from tests.bodies.hf import hf_rank_train
from tests.bodies.hf_context_parallel import hf_cp_rank_train
from tests.test_hf_context_parallel import reference as hf_cp_reference
from tests.test_hf_models import assert_training_parity as assert_hf_training_parity
from tests.test_plan import UNEVEN
from tests.test_plan import _check_against_ranks as check_plan_against_ranks

CONFIG = MoEConfig(
    vocab_size=32, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
    top_k=2, expert_hidden_size=8, num_shared_experts=1, num_dense_layers=1,
)  # fmt: skip
# lr 1e-3: TP's row-parallel all-reduces sum in another order than one process, and AdamW moves
# a near-zero gradient (a router's, with top-1 routing) by ~lr whatever its size; gradients are
# compared every step at fp32 tolerance, so a scale error cannot hide behind the smaller lr.
LR = 1e-3
SPEC = TrainSpec(config=CONFIG, steps=3, seq_len=8, lr=LR)
TP = TensorParallel()


@st.composite
def tp_configs(draw) -> MoEConfig:
    """Synthetic configs TP can shard at tp=2: even heads and kv heads, even MLP sizes."""
    heads = draw(st.sampled_from([2, 4]))
    return MoEConfig(
        vocab_size=32,
        hidden_size=draw(st.sampled_from([8, 16])),
        num_layers=2,
        num_heads=heads,
        num_kv_heads=draw(st.sampled_from([h for h in (2, 4) if heads % h == 0])),
        num_experts=4,
        top_k=draw(st.integers(1, 2)),
        expert_hidden_size=8,
        num_shared_experts=draw(st.integers(0, 1)),
        num_dense_layers=draw(st.integers(0, 1)),
        tie_embeddings=draw(st.booleans()),
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
    )


@settings(max_examples=examples(4), deadline=None)
@given(tp_configs())
def test_tensor_parallel_alone_trains_like_one_process(pool2, config):
    """tp=2 on 2 ranks (no data parallelism): drawn synthetic models, 3 AdamW steps."""
    spec = TrainSpec(config=config, steps=3, seq_len=8, lr=LR)
    degrees = MeshDegrees(dp_shard=1, tp=2)
    assert_training_parity(pool2.run(rank_train, spec, Pipeline((TP,)), degrees), spec, degrees)


@pytest.mark.parametrize(
    ("pipeline", "degrees"),
    [
        (TP | FSDP(), MeshDegrees(dp_shard=2, tp=2)),
        (TP | FSDP(), MeshDegrees(dp_replicate=2, dp_shard=1, tp=2)),
        (TP | ExpertParallel() | FSDP(), MeshDegrees(dp_shard=2, ep=2, tp=2)),
        (
            TP | ContextParallel() | ExpertParallel() | ActivationCheckpoint() | FSDP(),
            MeshDegrees(dp_shard=1, cp=2, ep=2, tp=2),
        ),
        (TP | ActivationCheckpoint(), MeshDegrees(dp_shard=1, tp=4)),
    ],
    ids=["tp-fsdp", "tp-hsdp", "tp-ep-fsdp", "tp-cp-ep-ac-fsdp", "tp4-ac"],
)
def test_tensor_parallel_composes_and_trains_like_one_process(pool4, pipeline, degrees):
    """Every gradient each step and the final parameters on 4 ranks (expert gradients divided
    by the token ranks, not the world: tp ranks hold the same tokens)."""
    spec = (
        SPEC if degrees.tp == 2 else attrs.evolve(SPEC, config=attrs.evolve(CONFIG, num_kv_heads=4))
    )
    assert_training_parity(pool4.run(rank_train, spec, pipeline, degrees), spec, degrees)


def test_parameters_land_on_the_expected_axes(pool4):
    """TP | EP | FSDP at dp 2 x tp 2 (ep 2): attention, dense and shared MLPs and the vocabulary
    2-D on (dp_shard_cp, tp); experts on the expert meshes only; norms and routers on dp only."""
    got = pool4.run(
        bodies.placements, SPEC, TP | ExpertParallel() | FSDP(), MeshDegrees(dp_shard=2, ep=2, tp=2)
    )[0]
    col = (("dp_shard_cp", "tp"), ("_S(0, 2)", "S(0)"))
    row = (("dp_shard_cp", "tp"), ("S(0)", "S(1)"))
    dp_only = (("dp_shard_cp",), ("S(0)",))
    expected = {
        "model.embed_tokens.weight": col,
        "model.norm.weight": dp_only,
        "lm_head.weight": col,
    }
    for i in (0, 1):
        block = f"model.layers.{i}"
        expected |= {f"{block}.self_attn.{n}_proj.weight": col for n in "qkv"}
        expected |= {f"{block}.self_attn.o_proj.weight": row}
        expected |= {
            f"{block}.{n}.weight": dp_only for n in ("input_layernorm", "post_attention_layernorm")
        }
    mlp, shared = "model.layers.0.mlp", "model.layers.1.mlp.shared_experts"
    for prefix in (mlp, shared):
        expected |= {f"{prefix}.gate_proj.weight": col, f"{prefix}.up_proj.weight": col}
        expected |= {f"{prefix}.down_proj.weight": row}
    expected |= {"model.layers.1.mlp.gate.weight": dp_only}
    experts = (("ep_shard", "ep"), ("_S(0, 2)", "S(0)"))
    expected |= {f"model.layers.1.mlp.experts.{n}": experts for n in ("gate_up_proj", "down_proj")}
    assert got == expected


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            MoEConfig(num_heads=4, num_kv_heads=1, num_experts=4),
            r"`model\.layers\.0\.self_attn` has 4 query heads and 1 key/value heads; both must "
            r"be divisible by tp \(2\)",
        ),
        (
            MoEConfig(num_heads=3, num_kv_heads=3, head_dim=4, num_experts=4),
            r"has 3 query heads and 3 key/value heads",
        ),
        (
            MoEConfig(
                vocab_size=33, num_heads=2, num_kv_heads=2, num_experts=4, tie_embeddings=False
            ),
            r"`model\.embed_tokens` has a vocabulary of 33, not divisible by tp \(2\)",
        ),
        (
            MoEConfig(
                num_heads=2,
                num_kv_heads=2,
                num_experts=4,
                num_shared_experts=1,
                expert_hidden_size=3,
            ),
            r"`model\.layers\.\d\.mlp\.shared_experts` has inner size 3, not divisible by tp \(2\)",
        ),
    ],
    ids=["kv-heads", "heads", "vocab", "shared-experts"],
)
def test_indivisible_sizes_are_refused_before_any_change(pool2, config, message):
    """Heads, kv heads, inner sizes and the vocabulary must divide by tp: a typed error that names
    the module and the numbers, the model untouched."""
    spec = TrainSpec(config=config)
    (res, _) = pool2.run(bodies.refusal, spec, TP | FSDP(), MeshDegrees(dp_shard=1, tp=2))
    assert res["error"] == "PassPreconditionError"
    assert res["untouched"]
    assert res["message"].startswith("`TensorParallel` cannot shard MoETransformer over tp=2:")
    assert re.search(message, res["message"]), res["message"]


def test_a_mesh_without_tp_and_a_second_application_are_refused():
    """A DeviceMesh without a `tp` dim names the missing axis; a second TP, or TP after another
    parallelism (DTensor parameters), is refused."""
    with fake_world(2):
        dm = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
        with pytest.raises(MeshAxisError, match=r"^`TensorParallel` needs the mesh axis `tp`"):
            TP.apply(MoETransformer(CONFIG), dm)
        mesh = ParallelMesh.build(dp_shard=1, tp=2)
        once = TP.apply(MoETransformer(CONFIG), mesh)
        with pytest.raises(PassAlreadyAppliedError, match=r"^`TensorParallel` was already applied"):
            TP.apply(once, mesh)
        ep_mesh = ParallelMesh.build(dp_shard=2, ep=2)
        sharded = ExpertParallel().apply(MoETransformer(CONFIG), ep_mesh)
        with pytest.raises(
            PassPreconditionError,
            match=r"^`TensorParallel` cannot transform `MoETransformer`: its parameter "
            r"`model\.layers\.\d\.mlp\.experts\.gate_up_proj` is already a DTensor, placed "
            r"outside moetx\.",
        ):
            TP.check(sharded, ep_mesh, ())


# ------------------------------------------------------------------ Hugging Face models


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_hf_models_train_like_one_process(pool4, family):
    """TP | EP | FSDP at dp 2 x tp 2 (ep 2) on unmodified HF models (2 kv heads): every gradient
    each step and the final parameters (HF attention infers local heads from the shapes)."""
    pytest.importorskip("transformers")
    spec = HFSpec(family=family, overrides=(("num_key_value_heads", 2),))
    degrees = MeshDegrees(dp_shard=2, ep=2, tp=2)
    results = pool4.run(hf_rank_train, spec, TP | ExpertParallel() | FSDP(), degrees)
    assert_hf_training_parity(spec, results, 2)


@pytest.mark.parametrize(
    ("family", "message"),
    [
        (
            "gpt_oss",
            r"`model\.layers\.0\.self_attn` holds parameters TP would have to split by head: \['sinks'\]",
        ),
    ],
)
def test_hf_attention_tp_cannot_split_is_refused(family, message):
    """gpt-oss's attention sinks (one per head) are refused at check time, by name."""
    pytest.importorskip("transformers")
    model = hf_build_model(HFSpec(family=family, overrides=(("num_key_value_heads", 2),)))
    with fake_world(2):
        mesh = ParallelMesh.build(dp_shard=1, tp=2)
        with pytest.raises(PassPreconditionError, match=message):
            TP.apply(model, mesh)


# --------------------------------------------------------------------------------- planning

TP_UNEVEN = attrs.evolve(UNEVEN, vocab_size=66, num_kv_heads=2)  # tp-divisible, FSDP-uneven


@pytest.mark.parametrize(
    ("pipeline", "degrees"),
    [
        (TP | FSDP(), MeshDegrees(dp_shard=2, tp=2)),
        (
            TP | ExpertParallel() | ActivationCheckpoint() | FSDP(),
            MeshDegrees(dp_shard=2, ep=2, tp=2),
        ),
    ],
    ids=["tp-fsdp", "tp-ep-ac-fsdp"],
)
def test_plan_bytes_equal_real_ranks(pool4, pipeline, degrees):
    """`plan` (meta, fake world) gives each rank's parameter, gradient and AdamW bytes and local
    shapes exactly as real ranks hold them, with 2-D (dp, tp) placements."""
    check_plan_against_ranks(pool4, pipeline, degrees, attrs.evolve(SPEC, config=TP_UNEVEN))


def test_plan_deepseek_v3_shaped_at_256_ranks_with_tp_8():
    """tp=8 x ep=32 on 256 ranks plans in seconds; tp shards attention, dense and shared MLPs
    and the vocabulary eight ways."""
    p = (TP | ExpertParallel() | ActivationCheckpoint() | FSDP(param_dtype="bfloat16")).plan(
        MoEConfig.deepseek_v3_shaped(), MeshDegrees(dp_shard=32, ep=32, tp=8)
    )
    groups = {g.pattern: g for g in p.groups}
    q = groups["model.layers.*.self_attn.q_proj.weight"]
    assert q.mesh_axes == ("dp_shard_cp", "tp") and "tp" in q.passes
    assert q.local_shape[0] * 8 * 32 == q.global_shape[0]
    assert groups["model.layers.*.mlp.experts.gate_up_proj"].mesh_axes == ("ep_shard", "ep")
    assert p.seconds < 60 and p.world_size == 256


# ------------------------------------------------------------------- sequence parallelism

SP = TensorParallel(sequence_parallel=True)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(
    ("pipeline", "degrees"),
    [
        (SP | ExpertParallel() | FSDP(), MeshDegrees(dp_shard=2, ep=2, tp=2)),
        (
            SP | ContextParallel() | ExpertParallel() | ActivationCheckpoint() | FSDP(),
            MeshDegrees(dp_shard=1, cp=2, ep=2, tp=2),
        ),
    ],
    ids=["sp-ep-fsdp", "sp-cp-ep-ac-fsdp"],
)
def test_sequence_parallel_trains_like_one_process(pool4, pipeline, degrees, tied):
    """Norms and residuals sharded on the sequence (MoE blocks gathering their tokens, aux loss
    on): every gradient each step and the final parameters, tied and untied embeddings."""
    config = attrs.evolve(CONFIG, tie_embeddings=tied, aux_loss_coef=0.01)
    spec = attrs.evolve(SPEC, config=config)
    assert_training_parity(pool4.run(rank_train, spec, pipeline, degrees), spec, degrees)


def test_sequence_parallel_shards_the_residual_stream_and_gathers_moe_inputs(pool2):
    """Block norms see S / tp positions; attention projections and the MoE router see all S."""
    got = pool2.run(bodies.residual_shapes, SPEC, Pipeline((SP,)), MeshDegrees(dp_shard=1, tp=2))
    h, s = CONFIG.hidden_size, SPEC.seq_len
    assert got[0] == {"norm": (2, s // 2, h), "attention": (2, s, h), "moe": (2 * s, h)}
    plain = pool2.run(bodies.residual_shapes, SPEC, Pipeline((TP,)), MeshDegrees(dp_shard=1, tp=2))
    assert plain[0]["norm"] == (2, s, h)


def test_sequence_parallel_refuses_a_length_tp_cannot_split(pool2):
    """A sequence not divisible by tp is a typed error on every tp rank, before any collective."""
    got = pool2.run(bodies.sequence_error, SPEC, Pipeline((SP,)), MeshDegrees(dp_shard=1, tp=2), 7)
    assert all(
        m.startswith(
            "SequenceDivisibilityError: The sequence length of `input_ids` (7) must be divisible "
            "by tp (2)"
        )
        for m in got
    )


def test_sequence_parallel_refuses_models_it_does_not_support():
    """MTP heads and Hugging Face models are refused at check time, naming the reason."""
    with fake_world(2):
        mesh = ParallelMesh.build(dp_shard=1, tp=2)
        mtp = MoETransformer(attrs.evolve(CONFIG, num_mtp_layers=1))
        with pytest.raises(PassPreconditionError, match=r"does not support MTP heads"):
            SP.apply(mtp, mesh)
        if importlib.util.find_spec("transformers"):
            hf = hf_build_model(HFSpec(family="mixtral", overrides=(("num_key_value_heads", 2),)))
            with pytest.raises(
                PassPreconditionError,
                match=r"^`TensorParallel\(sequence_parallel=True\)` cannot apply to "
                r"MixtralForCausalLM:\n  - sequence_parallel=True supports moetx's models",
            ):
                SP.apply(hf, mesh)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_hf_base_model_tp_plan_agrees_with_what_moetx_shards(family):
    """Every non-expert module HF's own `base_model_tp_plan` shards column- or row-wise, moetx
    shards the same way; its `replicated_with_grad_allreduce` modules are moetx's per-head
    replicas; routed experts (HF: expert TP) stay with `ExpertParallel`. (HF's DeepSeek-V3 plan
    leaves the latent attention replicated; moetx also splits its heads: proven by parity.)"""
    pytest.importorskip("transformers")
    spec = HFSpec(family=family, overrides=(("num_key_value_heads", 2),))
    model = hf_build_model(spec)
    hf_plan = spec.config().base_model_tp_plan
    targets = tp_targets(model, 2)  # HF's DeepSeek-V3 plan leaves latent attention out; moetx
    ours: dict[str, str] = {}
    for t in targets:
        local = t.fqn.removeprefix("model.")
        ours |= {f"{local}.{c}": "colwise" for c in t.colwise}
        ours |= {f"{local}.{c}": "rowwise" for c in t.rowwise}
        ours |= {f"{local}.{c}": "replicated_with_grad_allreduce" for c in t.per_head}
    for pattern, style in hf_plan.items():
        if ".experts" in pattern or style.startswith("embedding"):
            continue
        matching = {k: v for k, v in ours.items() if re.fullmatch(pattern.replace("*", r"\d+"), k)}
        if not matching:  # HF names a module this tiny config does not have (dense MLPs)
            assert not any(
                re.fullmatch(pattern.replace("*", r"\d+"), n)
                for n, _ in model.model.named_modules()
            )
            continue
        assert set(matching.values()) == {style}, (pattern, matching)


def test_plan_command_line_knows_tp(capsys):
    """`moetx plan --tp 2` plans on a (dp, tp) mesh and shows the tp axis."""
    assert plan_cli(["--world", "4", "--tp", "2", "--pipeline", "tp|fsdp"]) == 0
    out = capsys.readouterr().out
    assert "× tp 2" in out and "dp_shard_cp=2 × tp=2" in out


def test_hf_tensor_and_context_parallel_together(pool4):
    """TP | CP | EP | FSDP at tp 2 x cp 2 on HF Qwen3-MoE (heads split, sequences split, HF's
    attention registry): every gradient each step and the final parameters."""
    pytest.importorskip("transformers")
    spec = HFSpec(family="qwen3_moe", overrides=(("num_key_value_heads", 2),))
    pipeline = TP | ContextParallel(comm="p2p") | ExpertParallel() | FSDP()
    degrees = MeshDegrees(dp_shard=1, cp=2, ep=2, tp=2)
    results = pool4.run(hf_cp_rank_train, spec, pipeline, degrees)
    assert_matches_reference(results, hf_cp_reference(spec, 1), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------- activation checkpoint modes

AC_MODES = ("full", "router", "selective")


@pytest.mark.parametrize("tp", [TP, SP], ids=["tp", "sp"])
@pytest.mark.parametrize("mode", AC_MODES)
def test_tensor_parallel_with_each_checkpoint_mode_trains_like_one_process(pool2, mode, tp):
    """tp=2 on 2 ranks under every `ActivationCheckpoint` mode (selective saves TP's collective
    outputs), with and without sequence parallelism: every gradient each step."""
    spec = attrs.evolve(SPEC, config=attrs.evolve(CONFIG, aux_loss_coef=0.01))
    pipeline = tp | ActivationCheckpoint(mode=mode)
    degrees = MeshDegrees(dp_shard=1, tp=2)
    assert_training_parity(pool2.run(rank_train, spec, pipeline, degrees), spec, degrees)


# The ci profile runs the 4-rank case for selective mode (the one with its own code path for
# DTensor outputs); full and nightly run every mode.
_CI_SKIP = pytest.mark.skipif(examples(1) < 5, reason="full/nightly profile (4 ranks per mode)")


@pytest.mark.parametrize("tp", [TP, SP], ids=["tp", "sp"])
@pytest.mark.parametrize(
    "mode", [m if m == "selective" else pytest.param(m, marks=_CI_SKIP) for m in AC_MODES]
)
def test_tensor_parallel_fsdp_with_each_checkpoint_mode_trains_like_one_process(pool4, mode, tp):
    """dp_shard 2 x tp 2 on 4 ranks, `tp | ActivationCheckpoint(mode) | FSDP()`, every second
    block checkpointed in one case: every gradient each step and the final parameters."""
    spec = attrs.evolve(SPEC, config=attrs.evolve(CONFIG, aux_loss_coef=0.01))
    pipeline = tp | ActivationCheckpoint(mode=mode, every=2 if mode == "full" else 1) | FSDP()
    degrees = MeshDegrees(dp_shard=2, tp=2)
    assert_training_parity(pool4.run(rank_train, spec, pipeline, degrees), spec, degrees)
