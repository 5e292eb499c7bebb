"""A user's `DeviceMesh` passed to moetx over and over creates its process groups only once.

Each `DeviceMesh` -> `ParallelMesh` conversion carves new sub-meshes, each with new gloo groups
(file descriptors, threads, hidden collectives): a training loop calling `shard_sequence` with
a DeviceMesh ran out of file descriptors. The conversion is cached per mesh.
"""

from __future__ import annotations

from torch.distributed.device_mesh import init_device_mesh

from moetx.mesh.parallel_mesh import as_parallel_mesh
from moetx.models import MoEConfig
from moetx.testing import fake_world
from moetx.testing.train import TrainSpec
from tests.bodies import reliability as bodies

SPEC = TrainSpec(config=MoEConfig(num_experts=4, num_layers=1, num_dense_layers=0), steps=1)


def test_repeated_calls_with_a_device_mesh_create_no_groups_or_fds(pool2):
    """50 `shard_sequence` + `gather_sequence` and 10 `Pass.apply` + `Pipeline.apply` calls:
    after the first of each, the group registry and the open fds stay the same size."""
    for rank, res in enumerate(pool2.run(bodies.device_mesh_calls, SPEC, 50, 10)):
        groups_first, fds_first = res["first"]
        groups_last, fds_last = res["last"]
        assert groups_last == groups_first, (rank, res)
        assert fds_last <= fds_first, (rank, res)


def test_conversion_is_cached_per_mesh_and_rebuilt_in_a_new_world():
    """Same DeviceMesh: the same ParallelMesh. After the process group is destroyed and created
    again, an equal DeviceMesh (same ranks and names) gets a new one, not dead groups."""
    with fake_world(4):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "cp"))
        first = as_parallel_mesh(mesh)
        assert as_parallel_mesh(mesh) is first
        assert (
            as_parallel_mesh(init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "cp")))
            is first
        )
    with fake_world(4):
        again = as_parallel_mesh(init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "cp")))
        assert again is not first
        assert again["cp"].get_group() is not None
