"""Gradient accumulation with `no_sync`: k micro-batches per step equal one step on their union."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees, ParallelMesh
from moetx.models import MoEConfig
from moetx.passes import FSDP, ExpertParallel
from moetx.testing import compare, fake_world, gradients
from moetx.testing.train import TrainSpec, assert_matches_reference, build_model, train
from moetx.training.accumulate import no_sync
from tests.bodies import end_to_end as bodies

ATOL, RTOL = 2e-5, 1e-4
SPEC = TrainSpec(
    config=MoEConfig(
        num_experts=4, num_shared_experts=1, num_layers=2, num_dense_layers=1, num_mtp_layers=1
    ),
    steps=2,
    rows_per_rank=2,
)


@pytest.mark.parametrize(
    ("pipeline", "degrees", "micro"),
    [
        (Pipeline() | FSDP(), MeshDegrees(dp_shard=2), 2),
        (ExpertParallel() | FSDP(), MeshDegrees(dp_shard=2, ep=2), 2),
        (ExpertParallel() | FSDP(), MeshDegrees(dp_shard=2, ep=2), 3),
    ],
    ids=["fsdp-micro2", "ep-fsdp-micro2", "ep-fsdp-micro3"],
)
def test_accumulated_steps_equal_one_step_on_the_whole_batch(pool2, pipeline, degrees, micro):
    """Every gradient (experts' included: their divide factor applies once), every step, and
    the final parameters match one process stepping on all `2 ranks x micro` micro-batches;
    the non-last micro-batches ran no reduction collective, the last one did."""
    results = pool2.run(bodies.accumulate_train, SPEC, pipeline, degrees, micro=micro)
    global_rows = 2 * micro * SPEC.rows_per_rank
    ref = train(build_model(SPEC), bodies.step_batches(SPEC, global_rows), SPEC.lr)
    assert_matches_reference(results, ref, atol=ATOL, rtol=RTOL)
    for rank, res in enumerate(results):
        for step in range(SPEC.steps):
            *silent, last = res["reductions"][step]
            assert silent == [0] * (micro - 1) and last > 0, (rank, step, res["reductions"][step])


def test_plain_module_accumulates_in_grad():
    """Without FSDP units `no_sync` changes nothing: `.grad` sums the micro-batches."""
    model, whole = build_model(SPEC), build_model(SPEC)
    ids, labels = bodies.step_batches(SPEC, 4)[0]
    with no_sync(model):
        (model(ids[:2], labels=labels[:2]).loss / 2).backward()
    (model(ids[2:], labels=labels[2:]).loss / 2).backward()
    whole(ids, labels=labels).loss.backward()
    compare(gradients(whole), gradients(model), atol=1e-6, rtol=1e-5)


def _sync_flags(model: torch.nn.Module) -> list[bool]:
    # FSDP2 keeps the flag on each unit's parameter group (private, read-only here).
    units = [cast(FSDPModule, m) for m in model.modules() if isinstance(m, FSDPModule)]
    groups = [u._get_fsdp_state()._fsdp_param_group for u in units]  # type: ignore[attr-defined]
    return [g.reduce_grads for g in groups if g is not None]


def test_nested_and_disabled_blocks_restore_sync():
    """Only the outermost block re-enables sync; `enabled=False` leaves it on; errors restore it."""
    with fake_world(2):
        model = FSDP().apply(build_model(SPEC), ParallelMesh.build())
        assert all(_sync_flags(model)) and len(_sync_flags(model)) > 3
        with no_sync(model):
            with no_sync(model):
                assert not any(_sync_flags(model))
            assert not any(_sync_flags(model))
        assert all(_sync_flags(model))
        with no_sync(model, enabled=False):
            assert all(_sync_flags(model))
        with pytest.raises(KeyError), no_sync(model):
            raise KeyError("boom")
        assert all(_sync_flags(model))
