"""`ContextParallel`: both comm modes against one process, composition, preconditions, the batch call."""

from __future__ import annotations

import typing
from typing import Any

import attrs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moetx.core.algebra import Pipeline
from moetx.core.errors import (
    MeshAxisError,
    PassPreconditionError,
    SequenceDivisibilityError,
    UnsupportedAttentionError,
)
from moetx.core.record import applied_passes, check_not_failed
from moetx.mesh.parallel_mesh import MeshDegrees, ParallelMesh
from moetx.models import MoEConfig, MoETransformer
from moetx.passes.context_parallel.api import ContextParallel, ContextParallelInputError
from moetx.passes.context_parallel.attention import (
    COMMS,
    ContextParallelAttentionCore,
    sequence_index,
)
from moetx.passes.fsdp.api import FSDP
from moetx.testing import compare, examples, fake_world
from moetx.testing.train import TrainSpec, mean_losses, rank_train, reference, train
from tests.bodies import context_parallel as bodies
from tests.bodies.context_parallel import CPCase

TOL = {"atol": 1e-5, "rtol": 1e-4}
SMALL = MoEConfig(num_layers=2, num_dense_layers=1, aux_loss_coef=0.01)


# ------------------------------------------------------------------------------- the pass value


def test_value_semantics():
    """Repr is valid Python, equal values hash equally, `evolve` re-validates."""
    p = ContextParallel(comm="p2p", load_balance=False)
    assert eval(repr(p)) == p
    assert repr(ContextParallel()) == "ContextParallel()"
    assert hash(p) == hash(ContextParallel(comm="p2p", load_balance=False))
    assert attrs.evolve(p, comm="allgather", load_balance=True) == ContextParallel()
    assert ContextParallel.placement.stage == "cp"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        p.comm = "allgather"  # type: ignore[misc]
    with pytest.raises(
        ValueError, match=r"`ContextParallel\.comm` \('ring'\) must be one of 'allgather', 'p2p'\."
    ):
        attrs.evolve(p, comm="ring")
    with pytest.raises(
        TypeError, match=r"`ContextParallel\.load_balance` \(1\) must be True or False"
    ):
        ContextParallel(load_balance=1)  # type: ignore[arg-type]


# ------------------------------------------------------- parity with one process (2 gloo ranks)


def _reference(case: CPCase) -> dict[str, Any]:
    ids, labels, positions = case.batch_tensors()
    return bodies.model_outputs(MoETransformer(case.config()), ids, labels, positions)


def _check_model_parity(case: CPCase, results: list[dict[str, Any]]) -> None:
    """Attention outputs (put back in order), logits, loss, aux loss and mean gradients."""
    ref = _reference(case)
    assert float(ref["aux_loss"]) > 0 or not case.aux_loss_coef
    covered = torch.cat([r["index"] for r in results]).sort().values
    assert torch.equal(covered, torch.arange(case.seq_len))
    for layer, expected in enumerate(ref["attention"]):
        full = torch.full_like(expected, float("nan"))
        for r in results:
            full[:, r["index"]] = r["attention"][layer]
        compare({"out": expected}, {"out": full}, what=f"attention outputs, block {layer}", **TOL)
    for rank, r in enumerate(results):
        compare(
            {"logits": ref["logits"][:, r["index"]]},
            {"logits": r["logits"]},
            what=f"rank {rank} logits",
            **TOL,
        )
        compare(
            {"logits": ref["logits"]},
            {"logits": r["gathered_logits"]},
            what=f"rank {rank} gathered",
            **TOL,
        )
        compare(
            {"aux": ref["aux_loss"]}, {"aux": r["aux_loss"]}, what=f"rank {rank} aux loss", **TOL
        )
    mean_loss = torch.stack([r["loss"] for r in results]).mean()
    compare({"loss": ref["loss"]}, {"loss": mean_loss}, what="mean of the ranks' losses", **TOL)
    # Gradients averaged over the cp ranks, as FSDP (over dp_shard x cp) does.
    averaged = {k: sum(r["grads"][k] for r in results) / len(results) for k in ref["grads"]}
    compare(ref["grads"], averaged, what="cp-averaged gradients", **TOL)


@st.composite
def cp_cases(draw: Any, *, degree: int = 2) -> CPCase:
    heads = draw(st.sampled_from([1, 2, 4]))
    return CPCase(
        batch=draw(st.integers(1, 2)),
        seq_len=2 * degree * draw(st.integers(1, 4)),
        num_heads=heads,
        num_kv_heads=draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
        head_dim=draw(st.sampled_from([2, 4, 8])),
        num_layers=draw(st.integers(1, 2)),
        comm=draw(st.sampled_from(COMMS)),
        load_balance=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=examples(16), deadline=None)
@given(case=cp_cases())
def test_matches_one_process_2_ranks(pool2, case: CPCase):
    """cp=2, both comm modes, GQA, any layout: outputs, loss, aux loss and gradients match."""
    _check_model_parity(case, pool2.run(bodies.cp_model_step, case))


@pytest.mark.parametrize("comm", COMMS)
def test_matches_one_process_cp4(pool4, comm: str):
    """cp=4: three ring hops (and the gradient accumulators' full turn) or a 4-way gather."""
    case = CPCase(batch=2, seq_len=16, num_heads=4, num_kv_heads=2, comm=comm, seed=3)
    _check_model_parity(case, pool4.run(bodies.cp_model_step, case))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_math_block_kernel_matches_cpu_flash(causal: bool):
    """The float32 math block kernel (used off CPU) equals the CPU flash kernel, fwd and bwd."""
    from moetx.passes.context_parallel.blocks import (
        _attend,
        _attend_backward,
        _attend_backward_math,
        _attend_math,
    )

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k, v = torch.randn(2, 2, 2, 6 if causal else 10, 8, generator=g).unbind(0)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    dout = torch.randn(q.shape, generator=g)
    out, lse = _attend(q, k, v, causal, 0.3)
    got = _attend_math(q, k, v, causal, 0.3)
    compare({"out": out, "lse": lse}, {"out": got[0], "lse": got[1]}, what="forward", **TOL)
    want = _attend_backward(dout, q, k, v, out, lse, causal, 0.3)
    got_b = _attend_backward_math(dout, q, k, v, out, lse, causal, 0.3)
    compare(
        dict(zip("qkv", want, strict=True)),
        dict(zip("qkv", got_b, strict=True)),
        what="grads",
        **TOL,
    )


@pytest.mark.parametrize(
    ("comm", "mode"),
    [("p2p", "full"), ("allgather", "selective")],
    ids=["p2p-full", "allgather-selective"],
)
def test_cp_ac_fsdp_trains_like_one_process(pool2, comm: str, mode: str):
    """`ContextParallel() | ActivationCheckpoint() | FSDP()` on cp=2: recomputation re-runs the
    collectives of the CP kernels (p2p) or reuses them (selective keeps collective outputs)."""
    from moetx.passes.activation_checkpoint.api import ActivationCheckpoint

    degrees = MeshDegrees(cp=2)
    pipeline = ContextParallel(comm=comm) | ActivationCheckpoint(mode=mode) | FSDP()
    _assert_training_parity(pool2.run(rank_train, SPEC, pipeline, degrees), SPEC, degrees)


# ------------------------------------------------------------------ composition (4 gloo ranks)


def _assert_training_parity(
    results: list[dict[str, Any]], spec: TrainSpec, degrees: MeshDegrees
) -> None:
    ref = reference(spec, degrees.dp_replicate * degrees.dp_shard)
    for step, (got, want) in enumerate(zip(mean_losses(results), ref["losses"], strict=True)):
        compare({"loss": want}, {"loss": got}, what=f"loss at step {step}", **TOL)
    for r, res in enumerate(results):
        for step in range(spec.steps):
            compare(
                ref["grads"][step], res["grads"][step], what=f"rank {r} grads, step {step}", **TOL
            )
        compare(ref["params"], res["params"], what=f"rank {r} params", **TOL)


SPEC = TrainSpec(
    config=MoEConfig(num_layers=2, num_dense_layers=1, num_shared_experts=1, aux_loss_coef=0.01),
    steps=2,
    seq_len=8,
)


@pytest.mark.parametrize(
    ("pipeline", "degrees"),
    [
        (ContextParallel() | FSDP(), MeshDegrees(dp_shard=2, cp=2)),
        (ContextParallel(comm="p2p") | FSDP(), MeshDegrees(dp_shard=2, cp=2)),
    ],
    ids=["allgather", "p2p"],
)
def test_cp_fsdp_trains_like_one_process(pool4, pipeline: Pipeline, degrees: MeshDegrees):
    """`ContextParallel() | FSDP()` (dp 2 x cp 2): losses, every gradient, params, each step."""
    _assert_training_parity(pool4.run(rank_train, SPEC, pipeline, degrees), SPEC, degrees)


@pytest.mark.parametrize("comm", COMMS)
def test_cp_ep_fsdp_trains_like_one_process(pool4, comm: str):
    """`ContextParallel() | ExpertParallel() | FSDP()` with cp=2, ep=2 on 4 ranks."""
    from moetx.passes.expert_parallel.api import ExpertParallel

    degrees = MeshDegrees(dp_shard=2, cp=2, ep=2)
    pipeline = ContextParallel(comm=comm) | ExpertParallel() | FSDP()
    _assert_training_parity(pool4.run(rank_train, SPEC, pipeline, degrees), SPEC, degrees)


def test_cp_ep_matches_one_process(pool4):
    """`ContextParallel() | ExpertParallel()` (no FSDP), cp=2, ep=2: loss and hand-averaged grads.

    Without FSDP nothing reduces gradients, so the data-parallel mean is taken by hand: dense
    gradients averaged over the 4 ranks; expert shards (each already summed over its ep
    group's tokens) summed over the groups holding the same experts, divided by 4.
    """
    degrees = MeshDegrees(dp_shard=2, cp=2, ep=2)
    spec = attrs.evolve(SPEC, steps=1)
    results = pool4.run(bodies.cp_ep_step, spec, degrees, "p2p")
    ref = reference(spec, degrees.dp_shard)
    sharded = set(results[0]["sharded"])
    assert len(sharded) == 2
    one_per_group = {r["ep_group"]: r for r in results}.values()
    world = degrees.world_size
    averaged = {
        name: sum(r["grads"][name] for r in (one_per_group if name in sharded else results)) / world
        for name in ref["grads"][0]
    }
    compare(
        {"loss": ref["losses"][0]},
        {"loss": torch.stack([r["loss"] for r in results]).mean()},
        what="mean loss",
        **TOL,
    )
    compare(ref["grads"][0], averaged, what="hand-averaged gradients", **TOL)


def test_expert_unused_on_one_cp_rank_still_gets_its_gradient(pool2):
    """An expert no token of cp rank 0 picks: FSDP still reduces rank 1's gradient for it.

    With the attention output projections zeroed, routing depends on the token id only, so
    the batch can put every token that picks expert `e` on rank 1's chunks.
    """
    config = MoEConfig(num_layers=1, num_experts=4, top_k=1, vocab_size=32)
    picks = [row[0] for row in bodies.token_routing(config)]
    target = max(set(picks), key=picks.count)
    uses = [t for t in range(config.vocab_size) if picks[t] == target]
    others = [t for t in range(config.vocab_size) if picks[t] != target]
    # seq_len 8 on cp=2 (load-balanced): rank 0 holds tokens 0,1,6,7; rank 1 holds 2..5.
    index0 = sequence_index(4, 0, 2, True).tolist()
    ids = torch.tensor(
        [
            [
                others[(i + b) % len(others)] if i in index0 else uses[(i + b) % len(uses)]
                for i in range(9)
            ]
            for b in (0, 1)
        ]
    )
    batches = [(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())]
    assert not any(picks[t] == target for t in ids[:, :-1][:, index0].flatten().tolist())
    pipeline = ContextParallel() | FSDP()
    degrees = MeshDegrees(cp=2)
    results = pool2.run(bodies.cp_train_batches, config, pipeline, degrees, batches, 1e-2)
    ref = train(bodies.silence_attention_(MoETransformer(config)), batches, 1e-2)
    name = "model.layers.0.mlp.experts.down_proj"
    assert ref["grads"][0][name][target].abs().sum() > 0
    for rank, res in enumerate(results):
        compare(ref["grads"][0], res["grads"][0], what=f"rank {rank} grads", **TOL)
        compare(ref["params"], res["params"], what=f"rank {rank} params", **TOL)


# ---------------------------------------------------------------- the batch call (fake world)


def test_shard_sequence_layout_and_positions():
    """Rank 1 of cp=2 holds chunks 1 and 2 of 4 (load-balanced) or the second half."""
    with fake_world(2, rank=1):
        mesh = ParallelMesh.build(cp=2)
        ids = torch.arange(16).view(2, 8)
        positions = torch.tensor([0, 3, 4, 9, 10, 11, 20, 21])
        got = ContextParallel().shard_sequence(mesh, ids, ids + 100, positions)
        assert got[0].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
        assert got[1] is not None and got[1].tolist() == [
            [102, 103, 104, 105],
            [110, 111, 112, 113],
        ]
        assert got[2].tolist() == [[4, 9, 10, 11]] * 2
        ids2, labels2, pos2 = ContextParallel(load_balance=False).shard_sequence(mesh, ids)
        assert labels2 is None
        assert ids2.tolist() == [[4, 5, 6, 7], [12, 13, 14, 15]]
        assert pos2.tolist() == [[4, 5, 6, 7]] * 2
        assert sequence_index(4, 0, 2, True).tolist() == [0, 1, 6, 7]


def test_error_sequence_not_divisible():
    """Pinned: S not a multiple of 2 x cp (load-balanced) or of cp."""
    with fake_world(2):
        mesh = ParallelMesh.build(cp=2)
        with pytest.raises(
            SequenceDivisibilityError,
            match=(
                r"^The sequence length of `input_ids` \(6\) must be divisible by 2 × cp "
                r"\(2 × 2 = 4\): `ContextParallel\(load_balance=True\)` cuts every sequence into "
                r"4 equal chunks\.\n  fix: pad or trim the sequences to a multiple of 4\.$"
            ),
        ):
            ContextParallel().shard_sequence(mesh, torch.zeros(1, 6, dtype=torch.long))
        with pytest.raises(
            SequenceDivisibilityError,
            match=(
                r"^The sequence length of `input_ids` \(5\) must be divisible by cp \(2\): "
                r"`ContextParallel\(load_balance=False\)` cuts every sequence into 2 equal chunks"
            ),
        ):
            ContextParallel(load_balance=False).shard_sequence(
                mesh, torch.zeros(1, 5, dtype=torch.long)
            )
        with pytest.raises(
            ContextParallelInputError,
            match=r"^`labels` has shape \(1, 4\), which does not match `input_ids` \(1, 8\)\.$",
        ):
            ContextParallel().shard_sequence(
                mesh, torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 4)
            )


# -------------------------------------------------------------- structure and preconditions


def _layer(model: nn.Module, i: int) -> Any:
    """Block `i` of a `MoETransformer` (typed loosely: tests poke at its attributes)."""
    return typing.cast(MoETransformer, model).model.layers[i]


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {n: (id(p), p.detach().clone()) for n, p in model.named_parameters()},
        "modules": {n: (id(m), type(m)) for n, m in model.named_modules()},
        "hooks": len(model._forward_pre_hooks),
        "reducers": [getattr(m, "stats_reducer", None) for m in model.modules()],
    }


def _assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["hooks"] == before["hooks"] and after["reducers"] == before["reducers"]
    for name, (ident, value) in before["params"].items():
        assert after["params"][name][0] == ident and torch.equal(after["params"][name][1], value)
    assert applied_passes(model) == ()
    check_not_failed(model)


def test_apply_replaces_every_core_and_reducer():
    """Every block's core becomes the CP kernel, every MoE layer gets a reducer; facts say so."""
    with fake_world(2, rank=0):
        mesh = ParallelMesh.build(cp=2)
        model = MoETransformer(SMALL)
        params = dict(model.named_parameters())
        out = ContextParallel(comm="p2p").apply(model, mesh)
        assert out is model and dict(model.named_parameters()) == params
        for i in range(2):
            core = _layer(model, i).self_attn.core
            assert isinstance(core, ContextParallelAttentionCore)
            assert (core.comm, core.load_balance) == ("p2p", True)
        assert repr(_layer(model, 1).mlp.stats_reducer) == "StatsReducer(degree=2)"
        (entry,) = applied_passes(model)
        assert dict(entry.facts) == {
            "axis": "cp",
            "degree": 2,
            "comm": "p2p",
            "load_balance": True,
            "attention_cores": ("model.layers.0.self_attn.core", "model.layers.1.self_attn.core"),
        }
        with pytest.raises(
            ContextParallelInputError,
            match=r"^`MoETransformer` is context-parallel and was called without `position_ids`\.\n",
        ):
            model(torch.zeros(1, 4, dtype=torch.long))


def test_degree_one_installs_nothing():
    """cp=1: the model is unchanged and computes what it did; batches pass through."""
    with fake_world(2):
        mesh = ParallelMesh.build(cp=1)
        model = MoETransformer(SMALL)
        ids = torch.randint(0, 64, (1, 6))
        expected = model(ids).logits
        before = _snapshot(model)
        out = ContextParallel().apply(model, mesh)
        assert out is model and _snapshot(model)["modules"] == before["modules"]
        assert torch.equal(model(ids).logits, expected)
        got = ContextParallel().shard_sequence(mesh, ids)
        assert got[0] is ids and torch.equal(got[2], torch.arange(6).expand(1, 6))
        assert applied_passes(model)[0].facts["attention_cores"] == ()


class _BidirectionalCore(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class _FusedAttention(nn.Module):
    """An attention module without the `core` seam."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
        return self.inner(hidden, position_embeddings)


@pytest.mark.parametrize("via_pipeline", [False, True], ids=["pass", "pipeline"])
def test_error_unsupported_attention_before_mutation(via_pipeline: bool):
    """One block without the core seam, one non-causal core: both named, nothing changed."""
    with fake_world(2):
        mesh = ParallelMesh.build(cp=2)
        model = MoETransformer(attrs.evolve(SMALL, num_layers=3))
        _layer(model, 0).self_attn.core = _BidirectionalCore()
        _layer(model, 2).self_attn = _FusedAttention(_layer(model, 2).self_attn)
        before = _snapshot(model)
        apply = (ContextParallel() | FSDP()).apply if via_pipeline else ContextParallel().apply
        with pytest.raises(UnsupportedAttentionError) as info:
            apply(model, mesh)
        lines = str(info.value).splitlines()
        assert lines[:2] == [
            "`model.layers.0.self_attn` (`Attention`) in block `model.layers.0` cannot be made "
            "context-parallel: its core `model.layers.0.self_attn.core` (`_BidirectionalCore`) "
            "does not declare `is_causal = True`; moetx shards causal attention only.",
            "`model.layers.2.self_attn` (`_FusedAttention`) in block `model.layers.2` cannot be "
            "made context-parallel: it has no `core` child computing `core(q, k, v)`.",
        ]
        assert lines[2].startswith("  why: an attention left as it is would attend to 1/cp")
        assert lines[3].startswith("  fix: give every attention a parameter-free causal")
        _assert_untouched(model, before)


def test_error_attention_outside_the_blocks():
    """An attention module the block discovery does not reach is refused, not skipped."""
    with fake_world(2):
        model = MoETransformer(SMALL)
        model.pooler = nn.MultiheadAttention(16, 2)
        _layer(model, 1).cross_attn = nn.MultiheadAttention(16, 2)
        before = _snapshot(model)
        with pytest.raises(UnsupportedAttentionError) as info:
            ContextParallel().apply(model, ParallelMesh.build(cp=2))
        assert str(info.value).splitlines()[:2] == [
            "`model.layers.1.cross_attn` (`MultiheadAttention`) in block `model.layers.1` cannot "
            "be made context-parallel: moetx handles only each block's `self_attn`.",
            "`pooler` (`MultiheadAttention`) outside every transformer block cannot be made "
            "context-parallel: moetx handles only each block's `self_attn`.",
        ]
        _assert_untouched(model, before)


def test_error_mtp_head_and_missing_stats_hook():
    """Pinned: the MTP head is refused; so is an MoE layer without the aux-stat hook."""
    with fake_world(2):
        mesh = ParallelMesh.build(cp=2)
        model = MoETransformer(attrs.evolve(SMALL, num_mtp_layers=1))
        before = _snapshot(model)
        with pytest.raises(
            PassPreconditionError,
            match=(
                r"^`MoETransformer` has a multi-token-prediction head \(blocks `mtp\.0\.block`\), "
                r"which `ContextParallel` does not support: its label shift crosses "
                r"sequence-shard boundaries\.\n  fix: build the model without the MTP head "
                r"\(`num_mtp_layers=0`\), or train it without context parallelism\.$"
            ),
        ):
            ContextParallel().apply(model, mesh)
        _assert_untouched(model, before)

        model = MoETransformer(SMALL)
        delattr(_layer(model, 1).mlp, "stats_reducer")
        with pytest.raises(
            PassPreconditionError,
            match=(
                r"^MoE layer `model\.layers\.1\.mlp` has no `stats_reducer` hook, so "
                r"`ContextParallel` cannot reduce its aux-loss statistics over the cp group "
                r"\(1 layer\(s\) in all\)\.\n  fix: "
            ),
        ):
            ContextParallel().apply(model, mesh)
        assert applied_passes(model) == ()


def test_error_mesh_without_the_axis():
    """A user DeviceMesh with no cp dim: `MeshAxisError` naming the pass."""
    from torch.distributed.device_mesh import init_device_mesh

    with fake_world(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
        with pytest.raises(MeshAxisError, match=r"^`ContextParallel` needs the mesh axis `cp`"):
            ContextParallel().apply(MoETransformer(SMALL), mesh)
