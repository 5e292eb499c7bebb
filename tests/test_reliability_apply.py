"""Checked before anything changes, never half-applied: refusals on real gloo ranks (issue 13)."""

from __future__ import annotations

import pytest

from moetx import FSDP, ExpertParallel, MeshDegrees, MoetxError, PassPreconditionError, Pipeline
from moetx.models import MoEConfig
from moetx.testing.train import TrainSpec
from tests.bodies.reliability_b import try_apply

TIED = TrainSpec(config=MoEConfig(tie_embeddings=True), steps=1)


def _refused(results, error, match):
    """Every rank raised `error` matching `match`, and its model is exactly as before."""
    for rank, res in enumerate(results):
        assert res["error"] is not None, f"rank {rank} applied without error"
        name, text = res["error"]
        assert name == error, (rank, res["error"])
        with pytest.raises(Exception, match=match):
            raise Exception(text)
        assert res["changes"] == [], (rank, res["changes"])


def test_wrap_root_false_with_tied_embeddings_is_refused_before_mutation(pool2):
    """`FSDP(wrap_root=False)` would leave the tied embedding/lm-head weight a plain per-rank
    tensor that no unit reduces, so ranks diverge after one step: refused in `check`."""
    results = pool2.run(try_apply, TIED, Pipeline([FSDP(wrap_root=False)]), MeshDegrees(dp_shard=2))
    _refused(
        results,
        "PassPreconditionError",
        r"^`FSDP\(wrap_root=False\)` cannot shard the tied weight `model\.embed_tokens\.weight` "
        r"\(also `lm_head\.weight`\).*\n  fix: keep `wrap_root=True`",
    )


def test_wrap_root_false_with_tied_embeddings_is_refused_by_plan():
    """`Pipeline.plan` (apply on meta in a fake world) gives the same error, untouched model."""
    with pytest.raises(PassPreconditionError, match=r"cannot shard the tied weight"):
        Pipeline([FSDP(wrap_root=False)]).plan(TIED.config, MeshDegrees(dp_shard=2))


def test_equal_fsdp_values_behave_alike(pool2):
    """Two `FSDP` values that compare equal keep the same bytes gathered after forward (the
    int 1 used to equal `FSDP()` while FSDP2 kept every parameter gathered)."""
    from moetx import PassOptionError
    from tests.bodies.plan import gathered_after_forward

    spec = TrainSpec(config=MoEConfig(), steps=1)
    built = []
    for value in (True, False, 1):
        try:
            built.append(FSDP(reshard_after_forward=value))
        except PassOptionError:
            continue
    gathered = [
        pool2.run(gathered_after_forward, spec, Pipeline([p]), MeshDegrees(dp_shard=2))[0]
        for p in built
    ]
    assert gathered[0] == 0 < gathered[1]  # True frees, False keeps
    for i, a in enumerate(built):
        for j, b in enumerate(built):
            if a == b:
                assert (repr(a), gathered[i]) == (repr(b), gathered[j]), (a, b)
            else:
                assert repr(a) != repr(b)


# ------------------------------------------------- checked before anything changes (item 5)

EP_SPEC = TrainSpec(config=MoEConfig(num_experts=4), steps=1)
REFUSED = [
    pytest.param(
        ExpertParallel() | FSDP(reshard_after_forward=2),
        MeshDegrees(dp_shard=2, ep=2),
        None,
        "PassPreconditionError",
        r"^`FSDP\(reshard_after_forward=2\)` cannot reshard the routed experts to groups of 2: "
        r"their FSDP units shard over 1 rank \(dp_replicate × ep_shard\), and FSDP2 needs a "
        r"group size that divides it\.\n  fix: use reshard_after_forward=True or False\.",
        id="raf2-expert-mesh-of-1",
    ),
    pytest.param(
        Pipeline([FSDP(reshard_after_forward=4)]),
        MeshDegrees(dp_shard=2),
        None,
        "PassPreconditionError",
        r"^`FSDP\(reshard_after_forward=4\)` cannot reshard the dense parameters to groups of "
        r"4: their FSDP units shard over 2 ranks \(dp_shard × cp\), .*\n"
        r"  fix: use reshard_after_forward=True or False, or one of \(2,\)\.",
        id="raf4-dense-mesh-of-2",
    ),
    pytest.param(
        ExpertParallel(axis="dp_shard") | FSDP(),
        MeshDegrees(dp_shard=2),
        None,
        "MeshAxisError",
        r"^`ExpertParallel\(axis='dp_shard'\)` names the mesh axis `dp_shard`, but moetx lays "
        r"experts out on the `ep` axis only .*\n  fix: use `ExpertParallel\(\)`",
        id="ep-axis-dp_shard",
    ),
    pytest.param(
        Pipeline([FSDP()]),
        MeshDegrees(dp_shard=2),
        "fully_shard_by_torch",
        "PassPreconditionError",
        r"^`FSDP` cannot transform `FSDPMoETransformer`: it was already sharded by torch's "
        r"`fully_shard` \(the root module\), outside moetx\.\n  fix: ",
        id="fully-sharded-by-torch",
    ),
    pytest.param(
        ExpertParallel() | FSDP(),
        MeshDegrees(dp_shard=2, ep=2),
        "dtensor_router",
        "PassPreconditionError",
        r"^`ExpertParallel` cannot transform `MoETransformer`: its parameter "
        r"`model\.layers\.0\.mlp\.gate\.weight` is already a DTensor, placed outside moetx\.\n"
        r"  fix: ",
        id="foreign-dtensor",
    ),
    pytest.param(
        Pipeline([FSDP()]),
        MeshDegrees(dp_shard=2),
        "bf16_with_fp32_routers",
        "PassPreconditionError",
        r"^`FSDP` would make `model\.layers\.0` one FSDP unit with parameters of several dtypes "
        r"\(torch\.bfloat16, torch\.float32: e\.g\. `model\.layers\.0\.mlp\.gate\.weight`\), "
        r"which FSDP2 refuses\.\n  fix: ",
        id="bf16-fp32-router-no-policy",
    ),
]


@pytest.mark.parametrize(("pipeline", "degrees", "prepare", "error", "match"), REFUSED)
def test_refused_before_anything_changes(pool2, pipeline, degrees, prepare, error, match):
    """Each of these passed every check and then failed inside torch, half-applied; now the
    check phase refuses it with a typed error and the model is exactly as it was."""
    _refused(pool2.run(try_apply, EP_SPEC, pipeline, degrees, prepare), error, match)


@pytest.mark.parametrize(
    ("pipeline", "degrees", "match"),
    [
        (p.values[0], p.values[1], p.values[4])
        for p in REFUSED
        if p.values[2] is None  # the model-independent ones: plan builds its own on meta
    ],
)
def test_plan_gives_the_same_error(pipeline, degrees, match):
    """`Pipeline.plan` applies on meta in a fake world: the same check, the same message."""
    with pytest.raises(MoetxError, match=match):
        pipeline.plan(EP_SPEC.config, degrees)


def test_bf16_with_fp32_routers_works_with_a_policy(pool2):
    """The supported way: `FSDP(param_dtype="bfloat16")` makes each router its own fp32 unit."""
    res = pool2.run(
        try_apply,
        EP_SPEC,
        Pipeline([FSDP(param_dtype="bfloat16")]),
        MeshDegrees(dp_shard=2),
        "bf16_with_fp32_routers",
    )
    assert [r["error"] for r in res] == [None, None]


def test_plan_refuses_a_mixed_dtype_unit_too():
    """`plan` copies a module to meta with its dtypes, so the dtype check runs there as well;
    the planned module itself is untouched."""
    from moetx.testing import snapshot
    from moetx.testing.train import build_model
    from tests.bodies.reliability_b import PREPARE

    model = PREPARE["bf16_with_fp32_routers"](build_model(EP_SPEC), MeshDegrees(dp_shard=2))
    before = snapshot(model)
    with pytest.raises(PassPreconditionError, match=r"one FSDP unit with parameters of several"):
        Pipeline([FSDP()]).plan(model, MeshDegrees(dp_shard=2))
    assert before.changes(model) == []


OUTPUT_DTYPE = [
    pytest.param(
        EP_SPEC,
        FSDP(output_dtype="bfloat16"),
        r"^`FSDP\(output_dtype='bfloat16'\)` casts every unit's output to torch\.bfloat16, but "
        r"without `param_dtype` no unit casts its inputs back, so the next one would get "
        r"torch\.bfloat16 activations for torch\.float32 weights \(FSDP2 fails at the first "
        r"forward\)\.\n  fix: set `param_dtype` too",
        id="output-dtype-without-param-dtype",
    ),
    pytest.param(
        TIED,
        FSDP(param_dtype="bfloat16", output_dtype="float32"),
        r"^`FSDP\(param_dtype='bfloat16', output_dtype='float32'\)` would feed torch\.float32 "
        r"block outputs to the tied lm head, which computes in the root unit with "
        r"torch\.bfloat16 weights and no input cast \(FSDP2 fails at the first forward\)\.\n"
        r"  fix: ",
        id="output-dtype-tied-lm-head",
    ),
]


@pytest.mark.parametrize(("spec", "fsdp", "match"), OUTPUT_DTYPE)
def test_output_dtype_that_breaks_the_first_forward_is_refused(pool2, spec, fsdp, match):
    """`output_dtype` casts unit outputs; where no unit casts them back, the first forward
    failed with a matmul dtype error after a successful apply. Refused in `check` now."""
    results = pool2.run(try_apply, spec, Pipeline([fsdp]), MeshDegrees(dp_shard=2))
    _refused(results, "PassPreconditionError", match)


@pytest.mark.parametrize(
    ("spec", "fsdp"),
    [
        (EP_SPEC, FSDP(param_dtype="bfloat16", output_dtype="float32")),
        (TIED, FSDP(param_dtype="bfloat16", output_dtype="bfloat16")),
    ],
    ids=["untied-fp32-outputs", "tied-same-dtype"],
)
def test_output_dtype_where_every_unit_casts_its_inputs_trains(pool2, spec, fsdp):
    """The accepted cases still apply and train a step."""
    results = pool2.run(try_apply, spec, Pipeline([fsdp]), MeshDegrees(dp_shard=2))
    assert [r["error"] for r in results] == [None, None]
