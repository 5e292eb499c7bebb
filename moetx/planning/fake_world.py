"""A one-process "fake" process group, for mesh-structure and placement tests at any world size.

torch's fake backend answers every collective instantly without communicating, so one process can
play any rank of a world of 256. Use it for structure only: meshes, sub-meshes, placements, local
shapes and collective counts. Values are meaningless (all_reduce is the identity, all_to_all with
split sizes writes zeros; TORCH-CPU-NOTES §5), so parity tests need `RankPool`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

from moetx.core.errors import ProcessGroupExistsError, WorldSizeError

__all__ = ["ProcessGroupExistsError", "fake_world"]


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[None]:
    """Make this process rank `rank` of a fake world of `world_size` ranks for the `with` block.

    On exit, even after an error, the default group and every group created inside the block
    (device-mesh sub-groups included) are destroyed.

    Args:
        world_size: Number of ranks to pretend.
        rank: The rank this process plays.

    Raises:
        WorldSizeError: `world_size` is below 1, or `rank` is outside `[0, world_size)`.
        ProcessGroupExistsError: A process group is already initialised in this process.

    Example:
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> with fake_world(8):
        ...     init_device_mesh("cpu", (4, 2), mesh_dim_names=("dp", "ep"))["ep"].size()
        2
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    if world_size < 1:
        raise WorldSizeError(f"`world_size` ({world_size}) must be at least 1.")
    if not 0 <= rank < world_size:
        raise WorldSizeError(f"`rank` ({rank}) must be in [0, {world_size}).")
    if dist.is_initialized():
        raise ProcessGroupExistsError(
            f"A process group (backend {dist.get_backend()!r}, world size "
            f"{dist.get_world_size()}) is already initialised in this process.\n"
            "  fix: use `fake_world` outside rank bodies and outside other process groups."
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
