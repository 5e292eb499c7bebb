"""`ExpertParallel`: sharding, both dispatchers against one process, gradient scale, collectives."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from moetx.core.errors import ExpertDivisibilityError, MeshAxisError, NoMoELayersError
from moetx.core.record import applied_passes, check_not_failed
from moetx.mesh.parallel_mesh import MeshDegrees, ParallelMesh
from moetx.models import MoEConfig, MoETransformer
from moetx.passes.expert_parallel.api import ExpertParallel, is_expert_parallel
from moetx.passes.expert_parallel.dispatch import DISPATCHERS
from moetx.structure.discovery import discover
from moetx.testing import compare, examples, fake_world, gradients
from moetx.testing.train import TrainSpec, build_model, global_batches
from tests.bodies import expert_parallel as bodies
from tests.bodies.expert_parallel import ROUTINGS, MoECase

TOL = {"atol": 1e-5, "rtol": 1e-4}

# Two backbone blocks (dense, then MoE) and an MTP depth (MoE): two MoE layers per forward.
MODEL = MoEConfig(
    hidden_size=16,
    num_layers=2,
    num_dense_layers=1,
    num_experts=4,
    top_k=2,
    num_shared_experts=1,
    num_mtp_layers=1,
    aux_loss_coef=0.01,
)
SPEC = TrainSpec(config=MODEL, rows_per_rank=2, seq_len=6, steps=1)


# ------------------------------------------------------------------------------- the pass value


def test_value_semantics():
    """Repr is valid Python, equal values hash equally, and `evolve` re-validates."""
    p = ExpertParallel(dispatcher="all_gather")
    assert eval(repr(p)) == p
    assert hash(p) == hash(ExpertParallel(dispatcher="all_gather"))
    assert attrs.evolve(p, dispatcher="all_to_all") == ExpertParallel()
    assert repr(ExpertParallel()) == "ExpertParallel()"
    assert repr(p) == "ExpertParallel(dispatcher='all_gather')"
    assert ExpertParallel.placement.stage == "ep"
    with pytest.raises(ValueError, match=r"`ExpertParallel\.dispatcher` \('ring'\) must be one of"):
        attrs.evolve(p, dispatcher="ring")


# ------------------------------------------------------------------ structure (fake world, 1 proc)


def _model(**overrides: Any) -> MoETransformer:
    return MoETransformer(attrs.evolve(MODEL, **overrides))


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {n: (id(p), p.detach().clone()) for n, p in model.named_parameters()},
        "classes": {n: type(m) for n, m in model.named_modules()},
    }


def _assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert after["classes"] == before["classes"]
    assert after["params"].keys() == before["params"].keys()
    for name, (ident, value) in before["params"].items():
        assert after["params"][name][0] == ident, name
        assert torch.equal(after["params"][name][1], value), name
    assert applied_passes(model) == ()
    check_not_failed(model)


@pytest.mark.parametrize("meta", [False, True], ids=["eager", "meta"])
def test_shards_expert_parameters_in_place(meta: bool):
    """Expert params become global-shape Shard(0) DTensors under their names; nothing else moves."""
    with fake_world(4, rank=1):
        mesh = ParallelMesh.build(ep=2)
        if meta:
            with torch.device("meta"):
                model = _model()
        else:
            model = _model()
        discover(model).moe_layers()[1].experts.get_parameter("down_proj").requires_grad_(False)
        before = dict(model.named_parameters())
        keys = list(model.state_dict())
        out = ExpertParallel().apply(model, mesh)
        assert out is model
        assert list(model.state_dict()) == keys
        expert_names = set(discover(model).expert_parameters())
        assert expert_names == {
            "model.layers.1.mlp.experts.gate_up_proj",
            "model.layers.1.mlp.experts.down_proj",
            "mtp.0.block.mlp.experts.gate_up_proj",
            "mtp.0.block.mlp.experts.down_proj",
        }
        for name, p in model.named_parameters():
            if name in expert_names:
                assert isinstance(p, DTensor) and isinstance(p, nn.Parameter), name
                assert p.placements == (Shard(0),) and p.device_mesh.mesh_dim_names == ("ep",)
                assert p.shape == before[name].shape
                assert p.requires_grad == (name != "mtp.0.block.mlp.experts.down_proj")
                assert p.to_local().shape[0] == before[name].shape[0] // 2
                assert p.to_local().is_meta == meta
                if not meta:  # the local shard does not keep the global tensor alive
                    assert p.to_local().untyped_storage().nbytes() == p.to_local().nbytes
            else:
                assert p is before[name], name
        for layer in discover(model).moe_layers():
            assert is_expert_parallel(layer.experts)
            assert type(layer.experts).__name__ == "ExpertParallelRoutedExperts"
            assert not is_expert_parallel(layer.module)
        (entry,) = applied_passes(model)
        assert entry.pass_ == ExpertParallel()
        assert dict(entry.facts) == {
            "axis": "ep",
            "degree": 2,
            "expert_params": tuple(sorted(expert_names, key=list(before).index)),
        }


def test_degree_one_installs_nothing():
    """At ep degree 1 the experts stay plain local tensors and the forward is unchanged."""
    with fake_world(2):
        model = _model()
        before = _snapshot(model)
        ids = torch.randint(0, MODEL.vocab_size, (1, 5))
        expected = model(ids).logits
        model = ExpertParallel().apply(model, ParallelMesh.build(ep=1))
        assert _snapshot(model)["classes"] == before["classes"]
        assert all(p is not None and not isinstance(p, DTensor) for p in model.parameters())
        assert {n: i for n, (i, _) in _snapshot(model)["params"].items()} == {
            n: i for n, (i, _) in before["params"].items()
        }
        assert torch.equal(model(ids).logits, expected)
        (entry,) = applied_passes(model)
        assert dict(entry.facts) == {"axis": "ep", "degree": 1, "expert_params": ()}


def test_error_expert_count_not_divisible():
    """6 experts on ep degree 4: a pinned message, raised before the model is touched."""
    with fake_world(4):
        mesh = ParallelMesh.build(ep=4)
        model = _model(num_layers=4, num_dense_layers=3, num_experts=6, num_mtp_layers=0)
        before = _snapshot(model)
        with pytest.raises(
            ExpertDivisibilityError,
            match=(
                r"^`model\.layers\.3\.mlp\.experts` has 6 experts, not divisible by ep degree 4\.\n"
                r"  fix: build the mesh with an ep degree that divides every expert count "
                r"\(one of \[1, 2, 3, 6\]\), or use a multiple of 4 experts\.$"
            ),
        ):
            ExpertParallel().apply(model, mesh)
        _assert_untouched(model, before)


def test_error_every_bad_layer_listed():
    """Every MoE layer whose count does not divide is named, backbone and MTP alike."""
    with fake_world(4):
        model = _model(num_experts=6)
        before = _snapshot(model)
        with pytest.raises(ExpertDivisibilityError) as info:
            ExpertParallel().apply(model, ParallelMesh.build(ep=4))
        assert str(info.value).splitlines()[:2] == [
            "`model.layers.1.mlp.experts` has 6 experts, not divisible by ep degree 4.",
            "`mtp.0.block.mlp.experts` has 6 experts, not divisible by ep degree 4.",
        ]
        _assert_untouched(model, before)


def test_error_no_moe_layers():
    """A dense model: names the class and what was looked for."""
    with fake_world(2):
        model = _model(num_dense_layers=2, num_mtp_layers=0)
        before = _snapshot(model)
        with pytest.raises(
            NoMoELayersError,
            match=(
                r"^`MoETransformer` has no MoE layers for `ExpertParallel` to shard: looked in "
                r"every decoder block \(and MTP block\) for an `mlp` or `block_sparse_moe` child "
                r"that has both an `experts` and a `gate` or `router` child\.\n  fix: "
            ),
        ):
            ExpertParallel().apply(model, ParallelMesh.build(ep=2))
        _assert_untouched(model, before)


def test_error_mesh_without_the_axis():
    """A user DeviceMesh without an ep axis, or an axis name moetx does not know."""
    from torch.distributed.device_mesh import init_device_mesh

    with fake_world(2):
        model = _model()
        before = _snapshot(model)
        mesh = ParallelMesh.from_device_mesh(
            init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
        )
        with pytest.raises(MeshAxisError, match=r"^`ExpertParallel` needs the mesh axis `ep`"):
            ExpertParallel().apply(model, mesh)
        with pytest.raises(MeshAxisError, match=r"^`ExpertParallel` needs the mesh axis `experts`"):
            ExpertParallel(axis="experts").apply(model, ParallelMesh.build(ep=2))
        _assert_untouched(model, before)


# ------------------------------------------------------------ one MoE layer vs one process (gloo)


@st.composite
def moe_cases(draw: st.DrawFn, *, degree: int) -> MoECase:
    """MoE layers on `degree` ranks, valid by construction (the routing scenario bounds k).

    Sampled lists put a typical value first, because hypothesis shrinks towards the first
    choice; zero-token ranks are drawn separately so they stay the exception, not the rule.
    """
    local = draw(st.sampled_from([2, 1, 3]))
    experts = local * degree
    routing = draw(st.sampled_from(ROUTINGS))
    max_k = {"random": experts, "remote": local, "cold_rank": experts - local}[routing]
    tokens = draw(st.lists(st.integers(1, 7), min_size=degree, max_size=degree))
    idle = draw(st.none() | st.integers(0, degree - 1))
    if idle is not None:
        tokens[idle] = 0
    return MoECase(
        num_experts=experts,
        top_k=draw(st.sampled_from([k for k in (2, 1, 3) if k <= max_k])),
        hidden_size=draw(st.sampled_from([h for h in (8, 4, 16) if h > degree])),
        tokens_per_rank=tuple(tokens),
        shared=draw(st.booleans()),
        routing=routing,
        dispatcher=draw(st.sampled_from(DISPATCHERS)),
        degree=degree,
        seed=draw(st.integers(0, 2**16)),
    )


def _moe_layer_reference(case: MoECase) -> dict[str, Any]:
    """One process: each rank's tokens through the same layer; the loss is the sum over ranks."""
    moe = discover(bodies.moe_case_model(case)).moe_layers()[0].module
    outs, hidden_grads, indices, copies = [], [], [], []
    for rank in range(case.degree):
        hidden, cotangent = bodies.moe_case_inputs(case, rank)
        hidden.requires_grad_(True)
        out, _ = moe(hidden)
        (out * cotangent).sum().backward()
        outs.append(out.detach())
        hidden_grads.append(hidden.grad)
        flat = hidden.detach().reshape(-1, case.hidden_size)
        index = moe.gate(flat)[0]
        indices.append(index)
        copies += [(int(e), rank, t, flat[t]) for t, row in enumerate(index) for e in row]
    # What each rank's experts must receive: grouped by expert, then by source rank, then in
    # token order; (expert, rank, token) is unique, so the sort key is total.
    copies.sort(key=lambda c: c[:3])
    local = case.num_experts // case.degree
    dispatched = []
    for rank in range(case.degree):
        mine = [c for c in copies if c[0] // local == rank]
        tokens = torch.stack([c[3] for c in mine]) if mine else torch.zeros(0, case.hidden_size)
        ids = torch.tensor([c[0] - rank * local for c in mine], dtype=torch.int64)
        dispatched.append({"tokens": tokens, "expert_ids": ids})
    return {
        "out": outs,
        "hidden_grad": hidden_grads,
        "grads": gradients(moe),
        "dispatched": dispatched,
        "indices": indices,
    }


def _check_moe_layer(case: MoECase, results: list[dict[str, Any]]) -> None:
    ref = _moe_layer_reference(case)
    experts = {n for n in ref["grads"] if n.startswith("experts.")}
    for rank, res in enumerate(results):
        assert res["missing"] == [], f"rank {rank}: no gradient for {res['missing']}"
        tokens, expert_ids = res["dispatched"]
        compare(
            ref["dispatched"][rank],
            {"tokens": tokens, "expert_ids": expert_ids},
            what=f"rank {rank} dispatched rows",
            atol=0.0,
            rtol=0.0,
        )
        compare(
            {"out": ref["out"][rank], "hidden_grad": ref["hidden_grad"][rank]},
            {"out": res["out"], "hidden_grad": res["hidden_grad"]},
            what=f"rank {rank} outputs",
            **TOL,
        )
        # Expert shards already hold the sum over every rank's tokens (not x ep, not / ep).
        compare(
            {n: ref["grads"][n] for n in experts},
            {n: res["grads"][n] for n in experts},
            what=f"rank {rank} expert gradients",
            **TOL,
        )
    # Router and shared experts saw only their rank's tokens: the sum over ranks is the reference.
    dense = {n: g for n, g in ref["grads"].items() if n not in experts}
    summed = {n: sum(r["grads"][n] for r in results) for n in dense}
    compare(dense, summed, what="router/shared gradients summed over ranks", **TOL)
    # The scenarios hold: the last rank's experts got nothing; no copy stayed on its rank.
    if case.routing == "cold_rank":
        assert ref["dispatched"][-1]["expert_ids"].numel() == 0
    if case.routing == "remote":
        local = case.num_experts // case.degree
        for rank in range(case.degree):
            assert not bool((ref["indices"][rank] // local == rank).any())


@settings(max_examples=examples(20), deadline=None)  # ~25 ms each; nightly runs 5x
@given(case=moe_cases(degree=2))
def test_moe_layer_matches_one_process_2_ranks(pool2, case: MoECase):
    """Outputs, input gradients and every parameter gradient match one process (ep=2)."""
    _check_moe_layer(case, pool2.run(bodies.moe_layer_step, case))


@settings(max_examples=examples(8), deadline=None)  # ~0.1 s each; nightly runs 5x
@given(case=moe_cases(degree=4))
def test_moe_layer_matches_one_process_4_ranks(pool4, case: MoECase):
    """Outputs, input gradients and every parameter gradient match one process (ep=4)."""
    _check_moe_layer(case, pool4.run(bodies.moe_layer_step, case))


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_edge_cases_2_ranks(pool2, dispatcher: str):
    """Mixed; no tokens anywhere; every token remote; a rank receiving, or sending, nothing."""
    cases = [("random", (5, 3)), ("random", (0, 0)), ("remote", (5, 3)), ("cold_rank", (0, 6))]
    for routing, tokens in cases:
        case = MoECase(
            num_experts=4,
            top_k=2,
            hidden_size=8,
            tokens_per_rank=tokens,
            shared=True,
            routing=routing,
            dispatcher=dispatcher,
            degree=2,
        )
        _check_moe_layer(case, pool2.run(bodies.moe_layer_step, case))


# ------------------------------------------------- whole model, different data per rank (gloo)


def _model_reference(spec: TrainSpec, world: int) -> dict[str, Any]:
    ids, labels = global_batches(spec, world)[0]
    model = build_model(spec)
    out = model(ids, labels=labels)
    out.loss.backward()
    return {"loss": out.loss.detach(), "logits": out.logits.detach(), "grads": gradients(model)}


def _check_data_parallel(
    spec: TrainSpec, degrees: MeshDegrees, results: list[dict[str, Any]]
) -> None:
    world = degrees.world_size
    ref = _model_reference(spec, world)
    sharded = set(results[0]["sharded"])
    assert len(sharded) == 4  # two MoE layers x (gate_up_proj, down_proj)
    rows = spec.rows_per_rank
    for rank, res in enumerate(results):
        compare(
            {"logits": ref["logits"][rank * rows : (rank + 1) * rows]},
            {"logits": res["logits"]},
            what=f"rank {rank} logits",
            **TOL,
        )
    compare(
        {"loss": ref["loss"]},
        {"loss": torch.stack([r["loss"] for r in results]).mean()},
        what="mean loss",
        **TOL,
    )
    # The data-parallel average, by hand: dense grads averaged over all ranks; expert grads
    # (each ep group's shards already summed over that group's tokens) summed over the groups
    # holding the same experts, then divided by the world size.
    one_per_group = {r["ep_group"]: r for r in results}.values()
    averaged = {
        name: (
            sum(r["grads"][name] for r in one_per_group) / world
            if name in sharded
            else sum(r["grads"][name] for r in results) / world
        )
        for name in ref["grads"]
    }
    compare(ref["grads"], averaged, what=f"data-parallel gradients ({degrees})", **TOL)


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_model_gradients_data_parallel_2_ranks(pool2, dispatcher: str):
    """ep=2 on 2 ranks, each its own rows: loss, logits and every averaged gradient match."""
    degrees = MeshDegrees(dp_shard=2, ep=2)
    _check_data_parallel(SPEC, degrees, pool2.run(bodies.model_step, SPEC, degrees, dispatcher))


@pytest.mark.parametrize("ep", [2, 4])
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_model_gradients_data_parallel_4_ranks(pool4, dispatcher: str, ep: int):
    """4 ranks with ep=2 (two groups hold the same experts) and ep=4 (ep = world size)."""
    degrees = MeshDegrees(dp_shard=4, ep=ep)
    _check_data_parallel(SPEC, degrees, pool4.run(bodies.model_step, SPEC, degrees, dispatcher))


def test_meta_built_model_matches(pool2):
    """Built on meta, sharded, then `to_empty` + `init_weights_`: same results as eager."""
    degrees = MeshDegrees(dp_shard=2, ep=2)
    results = pool2.run(bodies.model_step, SPEC, degrees, "all_to_all", meta=True)
    _check_data_parallel(SPEC, degrees, results)


# ------------------------------------------------------------------------------ collectives


def test_collective_counts(pool2):
    """Per MoE layer: forward 1 int64 count exchange + 2 all-to-alls, backward 2 all-to-alls."""
    degrees = MeshDegrees(dp_shard=2, ep=2)
    layers = 2
    for res in pool2.run(bodies.comm_counts, SPEC, degrees, "all_to_all"):
        assert res["forward"] == {
            "all_to_all_single[int64]": layers,
            "all_to_all_single[data]": 2 * layers,
        }
        assert res["backward"] == {"all_to_all_single[data]": 2 * layers}
    for res in pool2.run(bodies.comm_counts, SPEC, degrees, "all_gather"):
        assert res["forward"] == {
            "all_gather_into_tensor[int64]": 2 * layers,
            "all_gather_into_tensor[data]": 2 * layers,
            "reduce_scatter_tensor[data]": layers,
        }
        assert res["backward"] == {
            "reduce_scatter_tensor[data]": 2 * layers,
            "all_gather_into_tensor[data]": layers,
        }
