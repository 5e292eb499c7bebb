"""`Compile`: value and preconditions, its report, and parity under EP, AC, CP and FSDP on ranks.

Compiling is slow on the 2-core box, so the rank tests use `aot_eager` (dynamo + AOT autograd,
what decides graphs, breaks and recomputation), tiny models and 2 steps; the 4-rank matrix over
every `ActivationCheckpoint` mode runs in the `full`/`nightly` profiles.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import torch

import moetx
from moetx import (
    FSDP,
    ActivationCheckpoint,
    Compile,
    ContextParallel,
    EagerBlockWarning,
    ExpertParallel,
    MeshDegrees,
    ParallelMesh,
    PassOptionError,
    PassPreconditionError,
    Pipeline,
    PipelineOrderError,
    compile_report,
)
from moetx.models import MoEConfig
from moetx.passes.activation_checkpoint import MODES
from moetx.passes.compile import is_compiled
from moetx.structure import discover
from moetx.testing import examples, fake_world, gradients, nightly_param, snapshot
from moetx.testing.hf import HFSpec
from moetx.testing.hf import build_model as build_hf
from moetx.testing.hf import reference as hf_reference
from moetx.testing.ranks import RankPool
from moetx.testing.train import (
    TrainSpec,
    assert_matches_reference,
    build_model,
    mean_losses,
    rank_train,
    reference,
)
from tests.bodies.compile import compiled_hf_cp_train, compiled_hf_train, compiled_train
from tests.bodies.hf_context_parallel import masked_batches, train_hf

BACKEND = "aot_eager"
MODEL = MoEConfig(
    num_layers=2,
    num_dense_layers=1,
    num_experts=4,
    top_k=2,
    num_shared_experts=1,
    num_mtp_layers=1,
    routing_bias=True,  # the routing-load counter runs in every MoE block
    aux_loss_coef=0.01,  # and the sequence-wise balance loss (with CP, its stats all-reduce)
)
SPEC = TrainSpec(config=MODEL, steps=2, seq_len=8)
CP_SPEC = attrs.evolve(SPEC, config=attrs.evolve(MODEL, num_mtp_layers=0))  # CP refuses MTP
BLOCKS = ("model.layers.0", "model.layers.1", "mtp.0.block")
NIGHTLY = pytest.mark.skipif(examples(1) < 5, reason="full/nightly profile (slow: compiles)")


def _patient(pool: RankPool) -> Iterator[RankPool]:
    """`pool` allowing 300 s per call for this module: compiling can outlast the shared pools'
    60 s on a busy 2-core box (their gloo timeout is 300 s already, tests/conftest.py)."""
    before, pool.timeout = pool.timeout, 300.0
    try:
        yield pool
    finally:
        pool.timeout = before


@pytest.fixture(scope="module")
def pool2(pool2: RankPool) -> Iterator[RankPool]:
    """The session's 2 ranks (no ranks of its own to start and warm up), 300 s per call."""
    yield from _patient(pool2)


@pytest.fixture(scope="module")
def pool4(pool4: RankPool) -> Iterator[RankPool]:
    """The session's 4 ranks, 300 s per call (as `pool2`)."""
    yield from _patient(pool4)


@pytest.fixture(scope="module")
def mesh() -> Iterator[ParallelMesh]:
    """A one-rank mesh (fake process group): `Compile` needs a mesh but never communicates."""
    with fake_world(1):
        yield ParallelMesh.build()


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test compiles from an empty dynamo cache, and leaves none behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------ value and checks


def test_compile_is_a_value_that_parses_and_sits_between_ac_and_fsdp():
    """Hashable, `eval(repr)`, picklable; `parse` knows `compile`; the order rule places it."""
    p = Compile(backend="aot_eager", fullgraph=True)
    assert repr(p) == "Compile(backend='aot_eager', fullgraph=True)"
    assert eval(repr(p), {"Compile": Compile}) == p
    assert pickle.loads(pickle.dumps(p)) == p and hash(attrs.evolve(p)) == hash(p)
    assert Pipeline.parse("ep|ac|compile|fsdp") == (
        ExpertParallel() | ActivationCheckpoint() | Compile() | FSDP()
    )
    with pytest.raises(PipelineOrderError, match=r"`FSDP` must come after `Compile`"):
        FSDP() | Compile()
    with pytest.raises(PipelineOrderError, match=r"`Compile` must come after `ActivationCheck"):
        Compile() | ActivationCheckpoint()


def test_every_bad_option_is_one_error():
    """Backend, fullgraph and dynamic are checked at construction, all at once."""
    with pytest.raises(PassOptionError) as err:
        Compile(backend="tvm", fullgraph=1, dynamic="yes")  # type: ignore[arg-type]
    assert str(err.value) == (
        "`Compile.backend` ('tvm') must be one of 'inductor', 'aot_eager', 'eager'.\n"
        "`Compile.fullgraph` (1) must be True or False.\n"
        "`Compile.dynamic` ('yes') must be True, False or None.\n"
        "  fix: use allowed values, e.g. the defaults: "
        "`Compile(backend='inductor', fullgraph=False, dynamic=None)`."
    )


def test_refusals_name_the_fix_and_touch_nothing(mesh):
    """An inductor mode on another backend, or a block compiled outside moetx: typed, untouched."""
    model = build_model(SPEC)
    model.model.layers[1].compile(backend="eager")
    before = snapshot(model)
    with pytest.raises(PassPreconditionError) as err:
        Compile(backend="aot_eager", mode="max-autotune").apply(model, mesh)
    assert str(err.value) == (
        "`Compile(backend='aot_eager', mode='max-autotune')`: `mode` selects an inductor "
        "configuration, and the backend is 'aot_eager'.\n"
        "  fix: drop `mode`, or use backend='inductor'."
    )
    with pytest.raises(PassPreconditionError) as err:
        Compile().apply(model, mesh)
    assert str(err.value) == (
        "`MoETransformer` is already compiled outside moetx (`model.layers.1`); `Compile` would "
        "compile it twice.\n  fix: build the model afresh and let `Compile` compile its blocks."
    )
    assert before.changes(model) == []
    with pytest.raises(PassPreconditionError, match=r"has no `Compile` in its pipeline"):
        compile_report(model)


def test_names_stay_and_the_facts_hold_a_live_report(mesh):
    """State-dict keys are unchanged; the record lists the blocks and the report to be filled."""
    model = build_model(SPEC)
    keys = list(model.state_dict())
    model = Compile(backend=BACKEND).apply(model, mesh)
    assert list(model.state_dict()) == keys
    assert all(is_compiled(b.module) for b in discover(model).blocks)
    facts = moetx.applied_passes(model)[-1].facts
    assert facts["blocks"] == BLOCKS and facts["report"] is compile_report(model)
    assert not compile_report(model).complete
    assert "model.layers.0: not run yet" in repr(compile_report(model))


def _one_process(pipeline: Pipeline, mesh: ParallelMesh) -> tuple[Any, Any, Any]:
    ids, labels = torch.randint(0, MODEL.vocab_size, (2, 2, 8), generator=torch.Generator())
    positions = torch.arange(8).expand(2, 8)

    def run(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(ids, labels=labels, position_ids=positions)
        out.loss.backward()
        return out.loss.detach(), gradients(model)

    want = run(build_model(SPEC))
    model = pipeline.apply(build_model(SPEC), mesh)
    return want, run(model), compile_report(model)


@pytest.mark.parametrize(
    "mode",
    [
        None,
        "router",
        # selective also compiles under EP | AC | FSDP on 2 ranks in ci, full and router under
        # ep(dedup) | AC | FSDP (test_dedup), all within tolerance
        *(
            nightly_param(m, why="2-rank EP|AC|Compile|FSDP runs it")
            for m in MODES
            if m != "router"
        ),
    ],
)
def test_one_process_is_exact_and_every_block_compiles_whole(mesh, mode):
    """Loss and every gradient bitwise equal to eager, per AC mode; one graph, no break, per block.

    ci runs no AC and the default (router) mode."""
    ac = ActivationCheckpoint(mode=mode) if mode else Pipeline()
    (want_loss, want), (loss, got), report = _one_process(ac | Compile(backend=BACKEND), mesh)
    assert torch.equal(loss, want_loss)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), mode
    assert report.complete
    assert {f: (s.graphs, s.graph_breaks) for f, s in report.blocks.items()} == {
        f: (1, 0) for f in BLOCKS
    }, report


def test_a_block_that_runs_eagerly_warns(mesh):
    """A first call that ran no compiled graph is an `EagerBlockWarning` naming the block."""
    model = Compile(backend=BACKEND).apply(build_model(SPEC), mesh)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with (
        torch._dynamo.config.patch(disable=True),
        pytest.warns(EagerBlockWarning) as warned,
    ):
        model(ids, labels=ids, position_ids=torch.arange(8)[None])
    assert [str(w.message) for w in warned] == [
        f"`Compile`: block `{f}` ran eagerly: torch.compile made no graph of its forward "
        "(0 graph breaks counted).\n  fix: run with `TORCH_LOGS=graph_breaks` to see why, or "
        "pass `fullgraph=True` to raise where dynamo gives up."
        for f in BLOCKS
    ]
    assert compile_report(model).blocks["model.layers.0"].graphs == 0
    with warnings.catch_warnings():  # later calls run the eager forward, and warn no more
        warnings.simplefilter("error")
        model(ids, labels=ids, position_ids=torch.arange(8)[None])


# ------------------------------------------------------------------------------ on ranks


def _assert_compiled_parity(results: list[dict[str, Any]], spec: TrainSpec, data: int) -> None:
    assert_matches_reference(results, reference(spec, data))
    model = build_model(spec)
    keys, blocks = sorted(model.state_dict()), [b.fqn for b in discover(model).blocks]
    for r in results:
        assert r["state_dict_keys"] == keys
        assert r["graphs"] == {f: (1, 0) for f in blocks}, r["reasons"]


@pytest.mark.parametrize(
    "min_unit_bytes",
    [0, nightly_param(1 << 20, id="grouped", why="the bf16 test runs grouped units in ci")],
    ids=["per-block", "grouped"],
)
def test_ep_compile_fsdp_fullgraph_matches_one_process_on_2_ranks(pool2, min_unit_bytes):
    """ep = world = 2, `fullgraph=True`: every gradient each step, one graph per block; also
    with every block in one FSDP unit (`min_unit_bytes`: each block's compiled forward runs
    between the group's hooks)."""
    fsdp = FSDP(min_unit_bytes=min_unit_bytes)
    pipe = ExpertParallel() | Compile(backend=BACKEND, fullgraph=True) | fsdp
    degrees = MeshDegrees(dp_shard=2, ep=2)
    _assert_compiled_parity(pool2.run(compiled_train, SPEC, pipe, degrees), SPEC, 2)


@pytest.mark.parametrize(
    "min_unit_bytes",
    [nightly_param(0, id="per-block", why="the fp32 test runs per-block units in ci"), 1 << 20],
    ids=["per-block", "grouped"],
)
def test_bf16_fsdp_with_an_fp32_router_unit_compiles_whole_like_eager_on_2_ranks(
    pool2, min_unit_bytes
):
    """`param_dtype="bfloat16"`: each router is its own fp32 FSDP unit nested in its block (its
    input cast done by a traced hook), the experts another; `fullgraph=True` holds, and every
    loss and gradient equals the same pipeline run eagerly; also with the blocks grouped."""
    spec = attrs.evolve(SPEC, param_dtype="bfloat16")
    fsdp = FSDP(param_dtype="bfloat16", reduce_dtype="float32", min_unit_bytes=min_unit_bytes)
    degrees = MeshDegrees(dp_shard=2, ep=2)
    eager = pool2.run(rank_train, spec, ExpertParallel() | fsdp, degrees)
    pipe = ExpertParallel() | Compile(backend=BACKEND, fullgraph=True) | fsdp
    compiled = pool2.run(compiled_train, spec, pipe, degrees)
    assert_matches_reference(compiled, eager[0] | {"losses": mean_losses(eager)}, atol=1e-2)
    assert all(r["graphs"] == {f: (1, 0) for f in BLOCKS} for r in compiled)


@pytest.mark.parametrize(
    "mode",
    [
        nightly_param("full", why="ci: test_dedup compiles ep(dedup) | ac(full) | fsdp"),
        nightly_param("router", why="ci: one process, and test_dedup's ac(router) pipeline"),
        "selective",
    ],
)
def test_ep_ac_compile_fsdp_fullgraph_matches_one_process_on_2_ranks(pool2, mode):
    """ep = world = 2, every AC mode (ci: selective), `fullgraph=True`: every gradient each
    step, 1 graph/block."""
    pipe = (
        ExpertParallel()
        | ActivationCheckpoint(mode=mode)
        | Compile(backend=BACKEND, fullgraph=True)
        | FSDP()
    )
    degrees = MeshDegrees(dp_shard=2, ep=2)
    _assert_compiled_parity(pool2.run(compiled_train, SPEC, pipe, degrees), SPEC, 2)


@pytest.mark.parametrize(
    "before",
    [
        nightly_param(
            "ep", why="ci: cp|ep|ac|compile|fsdp on 4 ranks shards the experts over ep_shard 2"
        ),
        nightly_param("cp|ep", why="cp|ep|ac|compile|fsdp on the same mesh runs in ci"),
    ],
)
def test_compile_fsdp_with_sharded_experts_compiles_whole_on_4_ranks(pool4, before):
    """ep 2 x ep_shard 2 (with cp 2 too): the experts are a real nested FSDP unit (2 shards),
    and `fullgraph=True` holds: every gradient each step, one graph per block."""
    pipe = Pipeline.parse(f"{before}|compile(backend={BACKEND!r}, fullgraph=True)|fsdp")
    cp = 1 + before.count("cp")
    degrees, spec = MeshDegrees(dp_shard=4 // cp, cp=cp, ep=2), CP_SPEC if cp > 1 else SPEC
    _assert_compiled_parity(pool4.run(compiled_train, spec, pipe, degrees), spec, 4 // cp)


def test_cp_ep_ac_compile_fsdp_matches_one_process_on_4_ranks(pool4):
    """cp 2 x ep 2 with router AC: every gradient each step, one graph per block."""
    pipe = (
        ContextParallel()
        | ExpertParallel()
        | ActivationCheckpoint()
        | Compile(backend=BACKEND, fullgraph=True)
        | FSDP()
    )
    degrees = MeshDegrees(dp_shard=2, cp=2, ep=2)
    _assert_compiled_parity(pool4.run(compiled_train, CP_SPEC, pipe, degrees), CP_SPEC, 2)


@NIGHTLY
@pytest.mark.parametrize("mode", MODES)
def test_every_ac_mode_compiles_under_ep_and_fsdp_on_4_ranks(pool4, mode):
    """The 4-rank matrix: ep 2 x ep_shard 2, each AC mode, fullgraph."""
    pipe = (
        ExpertParallel()
        | ActivationCheckpoint(mode=mode)
        | Compile(backend=BACKEND, fullgraph=True)
        | FSDP()
    )
    degrees = MeshDegrees(dp_shard=4, ep=2)
    _assert_compiled_parity(pool4.run(compiled_train, SPEC, pipe, degrees), SPEC, 4)


@pytest.mark.parametrize(
    "ac",
    [
        nightly_param(False, why="ci runs it with AC"),
        nightly_param(True, why="ci: the 4-rank cp|ep|ac|compile|fsdp Qwen3-MoE test"),
    ],
)
def test_hf_qwen3_moe_compiles_under_ep_fsdp_on_2_ranks(pool2, ac):
    """A Hugging Face tiny model: every gradient each step; each block runs compiled graphs."""
    pytest.importorskip("transformers", reason="needs transformers>=5 (`pip install -e .[hf]`)")
    spec = HFSpec(family="qwen3_moe", steps=2)
    pipe = Pipeline((ExpertParallel(), *([ActivationCheckpoint()] if ac else [])))
    pipe = pipe | Compile(backend=BACKEND) | FSDP()
    results = pool2.run(compiled_hf_train, spec, pipe, MeshDegrees(dp_shard=2, ep=2))
    assert_matches_reference(results, hf_reference(spec, 2), atol=1e-5, rtol=1e-4)
    for r in results:
        assert r["graphs"] and all(graphs > 0 for graphs, _ in r["graphs"].values()), r["reasons"]


def test_hf_qwen3_moe_compiles_under_cp_ep_ac_fsdp_on_4_ranks(pool4):
    """cp 2 x ep 2 on 4 ranks, ring attention, router AC: the HF model trains like itself in one
    process (its own loss, every gradient each step) and every block compiles whole."""
    pytest.importorskip("transformers", reason="needs transformers>=5 (`pip install -e .[hf]`)")
    spec = HFSpec(family="qwen3_moe", steps=2)
    pipe = Pipeline.parse(f"cp(comm='p2p')|ep|ac|compile(backend={BACKEND!r})|fsdp")
    results = pool4.run(compiled_hf_cp_train, spec, pipe, MeshDegrees(dp_shard=2, cp=2, ep=2))
    one = train_hf(build_hf(spec), list(masked_batches(spec, 2 * spec.rows_per_rank)), spec.lr)
    assert_matches_reference(results, one, atol=1e-5, rtol=1e-4)
    for r in results:
        assert r["graphs"] and all(g > 0 for g, _ in r["graphs"].values()), r["reasons"]
        assert all(b == 0 for _, b in r["graphs"].values()), r["reasons"]
