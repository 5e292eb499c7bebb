"""Failures on real ranks: one rank raising ends every rank fast; bad input leaves models untouched."""

from __future__ import annotations

import time

import pytest

from moetx.core.errors import ExpertDivisibilityError
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import MoEConfig
from moetx.passes import FSDP, ExpertParallel
from moetx.testing import RankError, RankTimeoutError
from moetx.testing.train import TrainSpec
from tests.bodies import end_to_end as bodies

SPEC = TrainSpec(config=MoEConfig(num_experts=4, num_layers=2, num_dense_layers=1), steps=1)
EP_FSDP = ExpertParallel() | FSDP()


def test_rank_raising_mid_training_step_ends_every_rank_within_the_grace(pool4):
    """Rank 1 raises after the first MoE layer's all-to-alls of an `ExpertParallel() | FSDP()`
    step; ranks 0, 2, 3 wait in their next collective. The pool reports rank 1's error and
    kills the rest within its grace period; the next call gets fresh, working ranks."""
    with pytest.raises(RankError) as info:
        pool4.run(bodies.fail_mid_step, SPEC, EP_FSDP, MeshDegrees(dp_shard=4, ep=2), 1)
    reported = time.time()
    err = info.value
    assert not isinstance(err, RankTimeoutError)
    assert str(err).startswith("`fail_mid_step` failed on rank 1 (of 4).")
    assert set(err.exceptions) == {1}
    assert isinstance(err.exceptions[1], bodies.InjectedFault)
    assert {r: err.failures[r] for r in (0, 2, 3)} == {0: "killed", 2: "killed", 3: "killed"}
    # From the raise on rank 1 to the error in the parent: the grace, not a gloo timeout.
    raised = float(str(err.exceptions[1]).rsplit(" at ", 1)[1])
    assert reported - raised < pool4.grace + 10, reported - raised
    assert pool4.run(bodies.rank_number) == [0, 1, 2, 3]


def test_rank_raising_inside_pipeline_apply_is_reported_with_its_type(pool2):
    """Rank 1's model has 3 experts: its `ExpertDivisibilityError` reaches the parent, typed."""
    with pytest.raises(RankError) as info:
        pool2.run(bodies.fail_in_apply, SPEC, EP_FSDP, MeshDegrees(dp_shard=2, ep=2), 1)
    assert set(info.value.exceptions) == {1}
    assert isinstance(info.value.exceptions[1], ExpertDivisibilityError)
    assert "`model.layers.1.mlp.experts` has 3 experts, not divisible by ep degree 2." in str(
        info.value
    )
    assert pool2.run(bodies.rank_number) == [0, 1]


@pytest.mark.parametrize("case", bodies.BAD_INPUTS)
def test_bad_input_raises_its_error_and_leaves_the_model_untouched(pool2, case):
    """The README's apply-time errors on a real 2-rank mesh: typed, and the model keeps its
    parameter objects and values, module classes and record, and is not marked half-applied."""
    for rank, res in enumerate(
        pool2.run(bodies.bad_input, SPEC, MeshDegrees(dp_shard=2, ep=2), case)
    ):
        assert res["error"][0] == case, (rank, res["error"])
        assert res["same_params"] and res["same_classes"], (rank, res)
        assert res["same_record"] and res["not_marked_failed"], (rank, res)
        assert res["changes"] == [], (rank, res["changes"])


def test_no_mesh_group_waits_longer_than_torch_default(pool4):
    """No group moetx creates has a timeout above torch's 30-minute default (none infinite)."""
    for res in pool4.run(bodies.group_timeouts, MeshDegrees(dp_shard=2, cp=2, ep=2)):
        assert max(res.values()) <= 1800, res


def test_every_mesh_group_uses_the_process_group_timeout(pool4):
    """Each axis's group times out like the world group (`init_process_group(timeout=...)`)."""
    for res in pool4.run(bodies.group_timeouts, MeshDegrees(dp_shard=2, cp=2, ep=2)):
        assert set(res.values()) == {res["world"]}, res
