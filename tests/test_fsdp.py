"""FSDP pass: training parity on real gloo ranks, placements, memory, preconditions."""

from __future__ import annotations

import re

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moetx.core.algebra import Pipeline
from moetx.core.errors import PassPreconditionError, UnknownModelStructureError
from moetx.mesh.parallel_mesh import MeshDegrees, ParallelMesh
from moetx.models import MoEConfig, MoETransformer
from moetx.passes import (
    ActivationCheckpoint,
    Compile,
    ContextParallel,
    ExpertParallel,
    TensorParallel,
)
from moetx.passes.fsdp.api import FSDP
from moetx.planning.predict import predict
from moetx.structure.discovery import discover
from moetx.testing import examples, fake_world, snapshot
from moetx.testing.parity import compare
from moetx.testing.train import (
    TrainSpec,
    assert_training_parity,
    build_model,
    global_batches,
    mean_losses,
    rank_train,
    reference,
)
from tests.bodies.anatomy import step_collectives
from tests.bodies.fsdp import load_counts_and_dtypes, outer_root_train, placements, tied_after_fsdp

ATOL, RTOL = 2e-5, 1e-4


@st.composite
def small_configs(draw, *, experts_multiple_of=1):
    experts = experts_multiple_of * draw(st.integers(1, 2)) * 2
    return MoEConfig(
        vocab_size=32,
        hidden_size=draw(st.sampled_from([8, 16])),
        num_layers=draw(st.integers(1, 2)),
        num_heads=2,
        num_kv_heads=draw(st.sampled_from([1, 2])),
        num_experts=experts,
        top_k=draw(st.integers(1, min(2, experts))),
        expert_hidden_size=8,
        num_shared_experts=draw(st.integers(0, 1)),
        tie_embeddings=draw(st.booleans()),
        aux_loss_coef=draw(st.sampled_from([0.0, 0.01])),
    )


@settings(max_examples=examples(6), deadline=None)
@given(config=small_configs())
def test_fsdp_alone_trains_like_one_process_on_2_ranks(pool2, config):
    """`FSDP()` on 2 ranks: 3 AdamW steps match the global-batch reference step by step."""
    spec = TrainSpec(config=config)
    degrees = MeshDegrees(dp_shard=2)
    assert_training_parity(pool2.run(rank_train, spec, Pipeline([FSDP()]), degrees), spec, degrees)


@pytest.mark.parametrize(
    "degrees",
    [MeshDegrees(dp_shard=4), MeshDegrees(dp_replicate=2, dp_shard=2)],
    ids=["fsdp4", "hsdp2x2"],
)
def test_fsdp_on_4_ranks_and_hsdp(pool4, degrees):
    """Flat FSDP and HSDP (2 replicas x 2 shards) on 4 ranks match one process."""
    spec = TrainSpec(config=MoEConfig(num_shared_experts=1, num_dense_layers=1, num_layers=2))
    assert_training_parity(pool4.run(rank_train, spec, Pipeline([FSDP()]), degrees), spec, degrees)


def test_every_parameter_is_sharded_on_the_dense_mesh(pool2):
    """Structural check: every parameter is a DTensor Shard(0) over dp_shard_cp."""
    spec = TrainSpec(config=MoEConfig(num_dense_layers=1, num_layers=2, num_shared_experts=1))
    got = pool2.run(placements, spec, Pipeline([FSDP()]), MeshDegrees(dp_shard=2))
    for rank_result in got:
        for name, (dims, pls, _, _) in rank_result.items():
            assert dims == ("dp_shard_cp",), name
            assert pls == ("Shard(dim=0)",), name


def test_parameter_bytes_per_rank_are_near_ideal(pool4):
    """Per-rank parameter and gradient bytes / (total / world) <= 1.05 (deterministic bytes)."""
    spec = TrainSpec(
        config=MoEConfig(hidden_size=32, num_layers=2, num_experts=8, expert_hidden_size=16),
        steps=1,
    )
    results = pool4.run(rank_train, spec, Pipeline([FSDP()]), MeshDegrees(dp_shard=4))
    total = sum(t.numel() * t.element_size() for t in results[0]["params"].values())
    for r in results:
        assert r["param_bytes"] / (total / 4) <= 1.05
        assert r["grad_bytes"] / (total / 4) <= 1.05


def test_fsdp_is_frozen_data():
    """Frozen, hashable, valid-Python repr, derivable with evolve; validators teach."""
    p = FSDP(param_dtype="bfloat16", reduce_dtype="float32", fp32_modules=("router", "lm_head"))
    assert eval(repr(p), {"FSDP": FSDP}) == p
    assert hash(p) == hash(attrs.evolve(p))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        p.cpu_offload = True  # type: ignore[misc]
    with pytest.raises(
        ValueError, match=r"`FSDP\.param_dtype` \('bf16'\) must be one of None, 'float32', 'bf"
    ):
        FSDP(param_dtype="bf16")
    with pytest.raises(
        ValueError,
        match=r"^`FSDP\.fp32_modules` \(\('norm',\)\) must be a tuple of roles from \('router',",
    ):
        FSDP(fp32_modules=("norm",))
    with pytest.raises(
        ValueError, match=r"^`FSDP\.reshard_after_forward` \(0\) must be True, False or an int >= 2"
    ):
        FSDP(reshard_after_forward=0)


def test_wrap_root_false_refuses_to_leave_parameters_unsharded(pool2):
    """Without the root unit the MTP projection would be left out: refused before mutation."""
    spec = TrainSpec(config=MoEConfig(num_mtp_layers=1))
    with pytest.raises(Exception) as err:
        pool2.run(rank_train, spec, Pipeline([FSDP(wrap_root=False)]), MeshDegrees(dp_shard=2))
    assert "PassPreconditionError" in str(err.value)
    assert "would leave" in str(err.value)


WRAP_ROOT_SPEC = TrainSpec(
    config=MoEConfig(
        vocab_size=32, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
        top_k=2, expert_hidden_size=8, num_shared_experts=1, num_dense_layers=1,
    ),
    steps=2,
    lr=1e-3,
)  # fmt: skip
WRAP_ROOT_CASES = pytest.mark.parametrize(
    ("pipeline", "degrees"),
    [
        (Pipeline([FSDP(wrap_root=False)]), MeshDegrees(dp_shard=2)),
        (ExpertParallel() | FSDP(wrap_root=False), MeshDegrees(dp_shard=2, ep=2)),
        (ContextParallel() | FSDP(wrap_root=False), MeshDegrees(dp_shard=1, cp=2)),
        (TensorParallel() | FSDP(wrap_root=False), MeshDegrees(dp_shard=2, tp=2)),
    ],
    ids=["dp2", "ep2", "cp2", "tp2-dp2"],
)


@WRAP_ROOT_CASES
def test_wrap_root_false_trains_like_one_process_under_the_callers_root(request, pipeline, degrees):
    """`wrap_root=False` leaves the root to the caller: with the caller's outer module made the
    FSDP root, every gradient at every step and the final parameters equal one process's."""

    pool = request.getfixturevalue(f"pool{degrees.world_size}")
    results = pool.run(outer_root_train, WRAP_ROOT_SPEC, pipeline, degrees, wrap_outer=True)
    assert_training_parity(results, WRAP_ROOT_SPEC, degrees)


@WRAP_ROOT_CASES
def test_wrap_root_false_without_a_root_is_refused_at_the_first_forward(request, pipeline, degrees):
    """No caller-made FSDP root: the first forward raises `FSDPRootError` with the fix, on every
    rank, before FSDP2 fails inside torch (it raised `'FSDPCommContext' object has no attribute
    'device_handle'`, or "requires a single root module" for a unit of several blocks)."""

    pool = request.getfixturevalue(f"pool{degrees.world_size}")
    for r in pool.run(outer_root_train, WRAP_ROOT_SPEC, pipeline, degrees, wrap_outer=False):
        assert r == {
            "error": "FSDPRootError: `FSDP(wrap_root=False)`: `MoETransformer` was called with "
            "no FSDP root above its units, so FSDP2 cannot initialise them (it would fail in "
            "torch at this first forward).\n"
            "  fix: keep `wrap_root=True` (the default), or call `fully_shard` on the module "
            "that calls this model before its first forward."
        }


@pytest.mark.parametrize(
    ("pass_", "message"),
    [
        (FSDP(), "`FSDP` found no transformer blocks in `MoETransformer`; it shards one unit per "
         "block."),
        (TensorParallel(), "`TensorParallel` found no transformer blocks in `MoETransformer`."),
        (Compile(), "`MoETransformer` has no transformer blocks for `Compile`."),
    ],
    ids=["fsdp", "tp", "compile"],
)  # fmt: skip
def test_no_blocks_is_refused(pass_, message: str):
    """A module without decoder layers fails in structure discovery; a model whose layer list
    is empty is refused with the pass's own message, before anything is changed."""
    with fake_world(2):
        mesh = ParallelMesh.build(dp_shard=1, tp=2)
        with pytest.raises(UnknownModelStructureError, match=r"^`Linear` has no decoder layers"):
            pass_.apply(torch.nn.Linear(2, 2), mesh)
        model = MoETransformer(attrs.evolve(MoEConfig(), num_mtp_layers=0))
        model.model.layers = torch.nn.ModuleList()
        before = snapshot(model)
        with pytest.raises(PassPreconditionError, match=f"^{re.escape(message)}$"):
            pass_.apply(model, mesh)
        assert before.changes(model) == []


def test_tied_embeddings_stay_tied(pool2):
    """With tied embeddings, the lm head and the embedding remain one parameter."""
    spec = TrainSpec(config=MoEConfig(tie_embeddings=True))

    assert pool2.run(tied_after_fsdp, spec, MeshDegrees(dp_shard=2)) == [True, True]


def test_frozen_parameters_stay_frozen(pool2):
    """Frozen params get no gradient and no update; the rest train like one process."""
    spec = TrainSpec(config=MoEConfig(), frozen=("model.embed_tokens", "model.layers.0.self_attn"))
    degrees = MeshDegrees(dp_shard=2)
    results = pool2.run(rank_train, spec, Pipeline([FSDP()]), degrees)
    assert_training_parity(results, spec, degrees)
    frozen = {n for n, rg in results[0]["requires_grad"].items() if not rg}
    assert frozen == {n for n in results[0]["params"] if n.startswith(spec.frozen)}
    assert frozen and not frozen & set(results[0]["grads"][0])


def test_meta_device_model_materialises_to_the_eager_model(pool2):
    """Build on meta, shard, then `to_empty` + init: each rank only allocates its shards."""
    spec = TrainSpec(config=MoEConfig(num_shared_experts=1, num_mtp_layers=1))
    degrees = MeshDegrees(dp_shard=2)
    assert_training_parity(
        pool2.run(rank_train, spec, Pipeline([FSDP()]), degrees, meta=True), spec, degrees
    )


@pytest.mark.parametrize(
    "fsdp",
    [FSDP(cpu_offload=True), FSDP(reshard_after_forward=False)],
    ids=["offload", "no-reshard"],
)
def test_options_keep_parity(pool2, fsdp):
    """CPU offload (pin_memory off on CPU builds) and reshard_after_forward=False match too."""
    spec = TrainSpec(config=MoEConfig(), steps=2)
    degrees = MeshDegrees(dp_shard=2)
    assert_training_parity(pool2.run(rank_train, spec, Pipeline([fsdp]), degrees), spec, degrees)


def test_bf16_mixed_precision_matches_a_reference_with_the_same_casts(pool2):
    """bf16 params / fp32 reduce vs a single process computing on bf16 casts of fp32 weights."""
    spec = TrainSpec(config=MoEConfig(), steps=2, param_dtype="bfloat16")
    degrees = MeshDegrees(dp_shard=2)
    fsdp = FSDP(param_dtype="bfloat16", reduce_dtype="float32")
    results = pool2.run(rank_train, spec, Pipeline([fsdp]), degrees)
    ref = reference(spec, 2)
    for step in range(spec.steps):
        compare(
            {"loss": ref["losses"][step]},
            {"loss": mean_losses(results)[step]},
            atol=2e-2,
            rtol=2e-2,
        )
        compare(
            ref["grads"][step], results[0]["grads"][step], atol=3e-2, rtol=5e-2, what="bf16 grads"
        )
    assert all(p.dtype == torch.float32 for p in results[0]["params"].values())


EP_CASES = [
    (2, MeshDegrees(dp_shard=2, ep=2)),
    (4, MeshDegrees(dp_shard=4, ep=2)),
    (4, MeshDegrees(dp_shard=4, ep=4)),
    (4, MeshDegrees(dp_replicate=2, dp_shard=2, ep=2)),
]


@pytest.mark.parametrize(
    ("ranks", "degrees"), EP_CASES, ids=["ws2-ep2", "ws4-ep2", "ws4-ep4", "hsdp2x2-ep2"]
)
def test_ep_then_fsdp_has_the_right_gradient_scale(request, ranks, degrees):
    """`ExpertParallel() | FSDP()`: every gradient (expert ones included) matches one process.

    Covers ep < world (ep_shard ranks FSDP-shard the same experts) and ep == world (size-1 expert
    FSDP mesh, where torch 2.13 divides twice under forced SUM) and HSDP.
    """

    pool = request.getfixturevalue(f"pool{ranks}")
    spec = TrainSpec(
        config=MoEConfig(num_experts=4, num_shared_experts=1, num_dense_layers=1, num_layers=2)
    )
    results = pool.run(rank_train, spec, ExpertParallel() | FSDP(), degrees)
    assert_training_parity(results, spec, degrees)


@pytest.mark.parametrize(
    ("num_experts", "expected"),
    [(8, "_StridedShard(dim=0, sf=2)"), (2, "Shard(dim=1)")],
    ids=["dim0", "dim1-no-padding"],
)
def test_expert_placements_compose_ep_and_fsdp(pool4, num_experts, expected):
    """Experts: (_StridedShard on ep_shard, Shard(0) on ep) root-sharing meshes; dim 1 when
    there are more expert-FSDP shards than local experts, so nothing pads."""

    spec = TrainSpec(config=MoEConfig(num_experts=num_experts, top_k=1))
    got = pool4.run(placements, spec, ExpertParallel() | FSDP(), MeshDegrees(dp_shard=4, ep=2))
    for rank_result in got:
        experts = {n: v for n, v in rank_result.items() if ".experts." in n}
        assert experts
        for name, (dims, pls, local, full) in experts.items():
            assert dims == ("ep_shard", "ep"), name
            assert pls == (expected, "Shard(dim=0)"), (name, pls)
            assert local * 4 == full, (name, local, full)  # no padding: exactly 1/world each
        dense = {n: v for n, v in rank_result.items() if ".experts." not in n}
        assert all(d[0] == ("dp_shard_cp",) for d in dense.values())


@pytest.mark.parametrize(
    ("pipeline", "degrees"),
    [
        (Pipeline([FSDP()]), MeshDegrees(dp_shard=2)),
        (Pipeline([ContextParallel()]), MeshDegrees(dp_shard=1, cp=2)),
        (Pipeline([ExpertParallel()]), MeshDegrees(dp_shard=2, ep=2)),
        (Pipeline([ExpertParallel()]), MeshDegrees(dp_shard=2)),  # ep degree 1: a no-op
        (Pipeline([ActivationCheckpoint()]), MeshDegrees(dp_shard=2)),
        (Pipeline([Compile(backend="eager")]), MeshDegrees(dp_shard=2)),
        (Pipeline([TensorParallel()]), MeshDegrees(dp_shard=2, tp=2)),
        (TensorParallel(sequence_parallel=True) | ExpertParallel(), MeshDegrees(dp_shard=2, tp=2)),
    ],
    ids=["fsdp-dp2", "cp2", "ep2-dp2", "ep1-dp2", "ac-dp2", "compile-dp2", "tp2-dp2", "sp2-ep-dp2"],
)
def test_routing_load_counters_hold_global_counts(request, pipeline, degrees):
    """Aux-loss-free load counters are summed over all data and cp ranks, identical on each,
    whichever pass placed the model on the mesh (each installs the sum, once)."""

    spec = TrainSpec(config=MoEConfig(routing_bias=True, score_func="sigmoid", num_kv_heads=2))
    pool = request.getfixturevalue(f"pool{degrees.world_size}")
    got = pool.run(load_counts_and_dtypes, spec, pipeline, degrees)
    ref = build_model(spec)
    ids, labels = global_batches(spec, degrees.dp_replicate * degrees.dp_shard)[0]
    ref(ids, labels=labels).loss.backward()
    want = {layer.fqn: layer.router.expert_load for layer in discover(ref).moe_layers()}
    assert all(int(c.sum()) > 0 for c in want.values())
    for r in got:
        assert set(r["counts"]) == set(want)
        for k, v in want.items():
            assert torch.equal(r["counts"][k], v), (k, r["counts"][k], v)


def test_router_and_lm_head_compute_in_fp32_under_bf16(pool2):
    """Under a bf16 policy the router (and, when asked, the lm head) all-gather fp32 weights."""

    spec = TrainSpec(config=MoEConfig())
    fsdp = FSDP(param_dtype="bfloat16", fp32_modules=("router", "lm_head"))
    got = pool2.run(load_counts_and_dtypes, spec, Pipeline([fsdp]), MeshDegrees(dp_shard=2))
    assert got[0]["dtypes"] == {
        "router": torch.float32,
        "attention": torch.bfloat16,
        "lm_head": torch.float32,
    }
    got = pool2.run(
        load_counts_and_dtypes,
        spec,
        Pipeline([FSDP(param_dtype="bfloat16")]),
        MeshDegrees(dp_shard=2),
    )
    assert got[0]["dtypes"] == {
        "router": torch.float32,
        "attention": torch.bfloat16,
        "lm_head": torch.bfloat16,
    }


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_router_units_are_the_ones_the_planner_counts(pool2, param_dtype):
    """A router is an FSDP unit of its own only under a low-precision `param_dtype` (fp32
    policy, `fp32_modules`); with `param_dtype="float32"` it stays in its block's unit, as the
    planner counts. Every unit resharded after forward and none merged, so each unit shows:
    the all-gathers and reduce-scatters one step issues on 2 gloo ranks equal `predict`'s."""
    spec = TrainSpec(config=MoEConfig(num_experts=4, num_shared_experts=1), steps=1)
    degrees = MeshDegrees(dp_shard=2, ep=2)
    fsdp = FSDP(param_dtype=param_dtype, reshard_after_forward=True, min_unit_bytes=0)
    pipeline = ExpertParallel() | fsdp
    p = predict(spec.config, degrees, pipeline, seq=spec.seq_len, micro_batch=spec.rows_per_rank)
    want = {t.kind.removeprefix("fsdp_"): t.calls for t in p.comm if t.kind.startswith("fsdp_")}
    got = pool2.run(step_collectives, spec, pipeline, degrees)
    for counts in got:
        assert {k: counts.get(k, 0) for k in want} == want
    # 2 blocks, embedding, lm head, root; + 2 routers under bf16 (the experts: 1-rank meshes)
    assert want["reduce_scatter"] == (7 if param_dtype == "bfloat16" else 5)
