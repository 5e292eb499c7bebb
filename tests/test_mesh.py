"""ParallelMesh: degrees, inference, teaching errors, and the sub-meshes passes rely on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.device_mesh import init_device_mesh

from moetx.core.errors import MeshAxisError, MeshError
from moetx.mesh.parallel_mesh import MeshDegrees, ParallelMesh, as_parallel_mesh
from moetx.planning.fake_world import fake_world


@st.composite
def legal_degrees(draw):
    dp_replicate = draw(st.sampled_from([1, 2]))
    dp_shard = draw(st.sampled_from([1, 2, 4]))
    cp = draw(st.sampled_from([1, 2]))
    ep = draw(st.sampled_from([d for d in (1, 2, 4, 8) if (dp_shard * cp) % d == 0]))
    return dict(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, ep=ep)


@given(legal_degrees())
def test_inferred_dp_shard_fills_the_world(d):
    """`dp_shard=-1` takes the ranks left over; ep_shard × ep == dp_shard × cp."""
    ws = d["dp_replicate"] * d["dp_shard"] * d["cp"]
    got = MeshDegrees.resolve(ws, dp_replicate=d["dp_replicate"], cp=d["cp"], ep=d["ep"])
    assert got == MeshDegrees(**d)
    assert got.ep_shard * got.ep == got.dp_shard * got.cp
    assert got.world_size == ws


def test_ep_must_divide_dp_shard_times_cp():
    """Expert parallelism borrows data/context ranks; the error explains that."""
    with pytest.raises(
        MeshError,
        match=r"^`ep` \(3\) must divide `dp_shard × cp` \(4 × 1 = 4\): expert parallelism borrows",
    ):
        MeshDegrees.resolve(4, ep=3)


def test_degrees_must_multiply_to_the_world():
    """An explicit dp_shard that does not fill the world is refused."""
    with pytest.raises(
        MeshError,
        match=r"^`dp_replicate × dp_shard × cp` \(1 × 3 × 1 = 3\) must equal the world size \(4\)\.",
    ):
        MeshDegrees.resolve(4, dp_shard=3)
    with pytest.raises(
        MeshError,
        match=r"^The world size \(4\) is not divisible by `dp_replicate × cp` \(1 × 3 = 3\)",
    ):
        MeshDegrees.resolve(4, cp=3)
    with pytest.raises(MeshError, match=r"^`cp` \(0\) must be a positive integer\."):
        MeshDegrees.resolve(4, cp=0)


def test_build_needs_a_process_group():
    """Without init_process_group the error says what to do."""
    with pytest.raises(MeshError, match=r"needs an initialised process group"):
        ParallelMesh.build(ep=2)


@pytest.mark.parametrize(
    ("ws", "kw"),
    [
        (8, dict(dp_replicate=2, cp=2, ep=2)),
        (8, dict(ep=8)),
        (4, dict(cp=2, ep=4)),
        (256, dict(ep=64)),
    ],
)
def test_sub_meshes_have_the_right_sizes_and_share_a_root(ws, kw):
    """Every axis has its degree, and EP / expert-FSDP meshes share one root (FSDP2 needs it)."""
    with fake_world(ws, rank=ws - 1):
        m = ParallelMesh.build(**kw)
        for axis in ("dp_replicate", "dp_shard", "cp", "ep", "ep_shard", "dp_shard_cp"):
            assert m[axis].size() == m.degree(axis), axis
        assert m["ep"]._get_root_mesh() is m.expert_fsdp_mesh()._get_root_mesh()
        assert m.dense_fsdp_mesh().size() == m.degree("dp_shard_cp") * m.degree("dp_replicate")
        # ranks of one ep group are consecutive inside a dp_shard_cp group
        ep_ranks = m["ep"].mesh.tolist()
        assert ep_ranks == list(range(ep_ranks[0], ep_ranks[0] + m.degree("ep")))


def test_unknown_axis_is_an_error():
    """Asking for an axis moetx does not know names the known ones."""
    with fake_world(2):
        m = ParallelMesh.build()
        with pytest.raises(MeshAxisError, match=r"^`sp` is not a moetx mesh axis"):
            m["sp"]


def test_a_user_device_mesh_is_accepted_with_known_dim_names():
    """A DeviceMesh named among dp_replicate/dp_shard/cp converts; the passes' axes follow it."""
    with fake_world(4, rank=1):
        dm = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "cp"))
        m = as_parallel_mesh(dm)
        assert (m.degree("dp_shard"), m.degree("cp"), m.degree("ep")) == (2, 2, 1)
        with pytest.raises(MeshAxisError, match=r"^`ExpertParallel` needs the mesh axis `ep`"):
            m.require("ep", by="ExpertParallel")
        assert m.require("cp", by="ContextParallel").size() == 2


def test_a_user_device_mesh_with_foreign_dims_is_refused():
    """A mesh with a dim moetx does not know (`dp`) is refused with the fix."""
    with fake_world(4):
        dm = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        with pytest.raises(
            MeshAxisError,
            match=r"must name its dims among \('dp_replicate', 'dp_shard', 'cp', 'tp'\)",
        ):
            as_parallel_mesh(dm)
    with pytest.raises(
        TypeError, match=r"`mesh` must be a `moetx.ParallelMesh` or a `DeviceMesh` \(got `dict`\)"
    ):
        as_parallel_mesh({})  # type: ignore[arg-type]
