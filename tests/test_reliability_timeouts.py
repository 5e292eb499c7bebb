"""Every process group in play times out like the default group, not after torch's 30 minutes.

`DeviceMesh._flatten` and `_unflatten` create groups with torch's built-in default timeout (30 min
on gloo) unless one is passed (TORCH-CPU-NOTES §9); moetx flattened the HSDP expert-FSDP mesh
without it, so a stalled peer held an expert collective for half an hour. These tests use their
own 4-rank pool whose process group has a short timeout.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import MoEConfig
from moetx.passes import FSDP, ExpertParallel
from moetx.testing import RankPool
from moetx.testing.train import TrainSpec
from tests.bodies import reliability as bodies

SPEC = TrainSpec(config=MoEConfig(num_experts=4, num_layers=2, num_dense_layers=1), steps=1)
PG_TIMEOUT = 5.0
HSDP_EP = MeshDegrees(dp_replicate=2, dp_shard=2, ep=2)  # expert-FSDP groups {0, 2}, {1, 3}


@pytest.fixture(scope="module")
def short_pool4() -> Iterator[RankPool]:
    """4 ranks whose gloo process group times out after `PG_TIMEOUT` s (calls may take 60 s)."""
    with RankPool(4, timeout=60.0, pg_timeout=PG_TIMEOUT) as pool:
        yield pool


@pytest.mark.parametrize(
    "degrees",
    [
        HSDP_EP,
        MeshDegrees(dp_replicate=2, dp_shard=2, cp=1, ep=1),
        MeshDegrees(dp_shard=4, ep=2),
        MeshDegrees(dp_shard=2, ep=2, tp=2),
    ],
    ids=["hsdp-ep2", "hsdp-ep1", "fsdp-ep2", "tp2-ep2"],
)
def test_every_group_in_the_registry_has_the_process_group_timeout(short_pool4, degrees):
    """After building the mesh, `ExpertParallel() | FSDP()` and a step: no group waits longer."""
    for rank, res in enumerate(
        short_pool4.run(bodies.every_group_timeout, SPEC, ExpertParallel() | FSDP(), degrees)
    ):
        assert res["world"] == PG_TIMEOUT, (rank, res["world"])
        slow = {name: s for name, s in res["groups"].items() if s != PG_TIMEOUT}
        assert not slow, (rank, slow)


def test_stalled_peer_fails_an_hsdp_expert_collective_after_the_pg_timeout(short_pool4):
    """Rank 2 stalls; rank 0 waits on their expert-FSDP group and fails after ~PG_TIMEOUT s
    (not 30 min); ranks 1 and 3, the other expert group, complete."""
    stall = PG_TIMEOUT + 3
    res = short_pool4.run(bodies.stall_in_expert_group, HSDP_EP, 2, stall)
    assert res[2]["outcome"] == "stalled"
    assert res[1]["outcome"] == res[3]["outcome"] == "completed", res
    kind, message = res[0]["outcome"]
    assert kind in ("RuntimeError", "DistBackendError"), res[0]
    assert "timed out" in message.lower() or "timeout" in message.lower(), message
    assert PG_TIMEOUT - 1 <= res[0]["elapsed"] <= PG_TIMEOUT + 5, res[0]


@pytest.mark.parametrize(
    ("dims", "names"),
    [((2, 2), ("dp_replicate", "dp_shard")), ((4,), ("dp_shard",))],
    ids=["hsdp-2x2", "flat-4"],
)
def test_groups_made_from_a_user_device_mesh_have_the_process_group_timeout(
    short_pool4, dims, names
):
    """`ParallelMesh.from_device_mesh` (ep=2): every group it creates times out like WORLD."""
    for rank, res in enumerate(short_pool4.run(bodies.device_mesh_group_timeouts, dims, names)):
        assert res["groups"], (rank, res)  # it does create groups (the check is not vacuous)
        slow = {name: s for name, s in res["groups"].items() if s != PG_TIMEOUT}
        assert not slow, (rank, slow)
