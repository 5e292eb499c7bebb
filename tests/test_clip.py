"""Mesh-aware `clip_grad_norm_`: one global norm over dense, expert and replicated gradients."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import MoEConfig
from moetx.passes import FSDP, ExpertParallel
from moetx.testing import compare, examples, gradients
from moetx.testing.train import TrainSpec, build_model
from moetx.training.clip import clip_grad_norm_, grad_norm
from tests.bodies import end_to_end as bodies

SPEC = TrainSpec(
    config=MoEConfig(
        num_experts=4, num_shared_experts=1, num_layers=2, num_dense_layers=1, num_mtp_layers=1
    ),
    steps=1,
)
ROWS = 8
TOL: dict[str, Any] = {"atol": 1e-6, "rtol": 1e-4}
EP_FSDP = ExpertParallel() | FSDP()
EP_ALONE = Pipeline() | ExpertParallel()

CASES_2 = {
    "fsdp": (Pipeline() | FSDP(), MeshDegrees(dp_shard=2)),
    "ep-fsdp": (EP_FSDP, MeshDegrees(dp_shard=2, ep=2)),
    "ep-alone": (EP_ALONE, MeshDegrees(dp_shard=2, ep=2)),
}
CASES_4 = {
    "fsdp": (Pipeline() | FSDP(), MeshDegrees(dp_shard=4)),
    "ep-fsdp-ep2": (EP_FSDP, MeshDegrees(dp_shard=4, ep=2)),
    "ep-fsdp-ep4": (EP_FSDP, MeshDegrees(dp_shard=4, ep=4)),
    "ep-alone-ep2": (EP_ALONE, MeshDegrees(dp_shard=4, ep=2)),
    "hsdp-ep-fsdp": (EP_FSDP, MeshDegrees(dp_replicate=2, dp_shard=2, ep=2)),
}


def reference(spec: TrainSpec, factor: float, norm_type: float) -> dict[str, Any]:
    """torch's `clip_grad_norm_` on the single-process model after one global-batch backward.

    `max_norm` is `factor` times the unclipped norm: below 1 it clips, above it does not.
    """
    model = build_model(spec)
    ids, labels = bodies.step_batches(spec, ROWS)[0]
    model(ids, labels=labels).loss.backward()
    unclipped = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf, norm_type)  # scale 1
    max_norm = factor * float(unclipped)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)
    return {"max_norm": max_norm, "norm": norm, "grads": gradients(model)}


def assert_clipped_like_one_process(results: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    """Same norm on every rank (bitwise), equal to torch's on one process; same clipped grads."""
    for rank, res in enumerate(results):
        assert torch.equal(res["norm"], results[0]["norm"]), (rank, res["norm"], results[0]["norm"])
        compare({"norm": ref["norm"]}, {"norm": res["norm"]}, what=f"rank {rank} total norm", **TOL)
        compare(ref["grads"], res["grads"], what=f"rank {rank} clipped gradients", **TOL)


@settings(max_examples=examples(6), deadline=None)
@given(
    case=st.sampled_from(sorted(CASES_2)),
    norm_type=st.sampled_from([2.0, math.inf, 1.0, 3.0]),
    factor=st.sampled_from([0.1, 0.7, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_global_norm_on_2_ranks(pool2, case, norm_type, factor, seed):
    """FSDP, EP+FSDP and EP alone on 2 ranks: one norm, torch's single-process one, and clipping
    (max_norm = factor x the norm: clips below 1, leaves gradients alone above)."""
    spec = TrainSpec(config=SPEC.config, steps=1, seed=seed)
    ref = reference(spec, factor, norm_type)
    pipeline, degrees = CASES_2[case]
    results = pool2.run(
        bodies.clipped_gradients,
        spec,
        pipeline,
        degrees,
        ref["max_norm"],
        norm_type,
        global_rows=ROWS,
    )
    assert_clipped_like_one_process(results, ref)


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("case", sorted(CASES_4))
def test_global_norm_on_4_ranks(pool4, case, norm_type):
    """FSDP, EP+FSDP (ep=2, ep=4, HSDP) and EP alone on 4 ranks match one process."""
    ref = reference(SPEC, 0.5, norm_type)
    pipeline, degrees = CASES_4[case]
    results = pool4.run(
        bodies.clipped_gradients,
        SPEC,
        pipeline,
        degrees,
        ref["max_norm"],
        norm_type,
        global_rows=ROWS,
    )
    assert_clipped_like_one_process(results, ref)


def test_torch_clip_grad_norm_fails_on_mixed_meshes(pool2):
    """Pinned torch 2.13 behaviour (pytorch#180346): torch's `clip_grad_norm_` raises on EP+FSDP
    (DTensors on two meshes) and on EP alone (DTensors mixed with plain tensors); on FSDP alone
    (one mesh) it works and agrees with moetx's."""

    def run(case: str) -> list[dict[str, Any]]:
        pipeline, degrees = CASES_2[case]
        return pool2.run(
            bodies.clipped_gradients,
            SPEC,
            pipeline,
            degrees,
            1.0,
            2.0,
            global_rows=ROWS,
            torch_clip=True,
        )

    for res in run("ep-fsdp"):
        assert res["error"][0] == "RuntimeError"
        assert res["error"][1].startswith(
            "All operands in aten.stack.default must have the same mesh, but got DeviceMesh("
        )
    for res in run("ep-alone"):
        assert res["error"] == (
            "RuntimeError",
            "aten._foreach_norm.Scalar got mixed torch.Tensor and DTensor, need to convert all "
            "torch.Tensor to DTensor before calling distributed operators!",
        )
    want = reference(SPEC, 2.0, 2.0)["norm"]  # factor 2: the unclipped norm
    for res in run("fsdp"):
        compare({"norm": want}, {"norm": res["norm"]}, **TOL)


# ------------------------------------------------------------------------- one process, no mesh


def _model_with_grads(seed: int = 0) -> torch.nn.Module:
    model = build_model(TrainSpec(config=SPEC.config, seed=seed))
    ids, labels = bodies.step_batches(SPEC, 4)[0]
    model(ids, labels=labels).loss.backward()
    return model


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.5])
def test_plain_module_matches_torch(norm_type):
    """Without a process group it is torch's `clip_grad_norm_` (norm and clipped gradients)."""
    ours, theirs = _model_with_grads(), _model_with_grads()
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05, norm_type)
    got = clip_grad_norm_(ours, 0.05, norm_type)
    compare({"norm": want}, {"norm": got}, **TOL)
    compare(gradients(theirs), gradients(ours), **TOL)


def test_accepts_a_tensor_or_an_iterable_and_counts_shared_tensors_once():
    """A tensor, a list with duplicates, and a generator give the same norm."""
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.full((3,), 2.0)
    expected = torch.tensor(math.sqrt(12.0))
    compare({"n": expected}, {"n": grad_norm([w.grad])}, **TOL)
    compare({"n": expected}, {"n": clip_grad_norm_(w, 100.0)}, **TOL)
    compare({"n": expected}, {"n": clip_grad_norm_([w, w], 100.0)}, **TOL)
    compare({"n": expected}, {"n": clip_grad_norm_((p for p in [w]), 100.0)}, **TOL)


def test_no_gradients_gives_zero_and_changes_nothing():
    """Parameters without gradients are skipped; the norm of nothing is 0."""
    model = build_model(SPEC)
    assert float(clip_grad_norm_(model, 1.0)) == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_nonfinite_norm_raises_when_asked_and_leaves_gradients():
    """`error_if_nonfinite` raises before scaling; the gradients are unchanged."""
    w = torch.nn.Parameter(torch.ones(2))
    w.grad = torch.tensor([1.0, float("nan")])
    with pytest.raises(
        RuntimeError, match=r"^The total norm of order 2\.0 of the gradients is non-finite \(nan\)"
    ):
        clip_grad_norm_(w, 1.0, error_if_nonfinite=True)
    assert w.grad[0] == 1.0
    assert math.isnan(float(clip_grad_norm_(w, 1.0)))


def test_norm_type_must_be_positive():
    """p < 0 is refused with the value in the message (0 is torch's count, see reliability)."""
    w = torch.nn.Parameter(torch.ones(2))
    w.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"^`norm_type` \(-1\.0\) must be 0, positive or inf\.$"):
        clip_grad_norm_(w, 1.0, norm_type=-1.0)
