"""Where a meta trace runs: a fake world whose backend serves `meta` tensors, and CP attention's
block kernel as CPU ranks run it (the flash kernel), so `predict`'s traces see what real ranks do."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import _redistribute as dtensor_redistribute
from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache
from torch.distributed.tensor.debug import _clear_sharding_prop_cache

from moetx.passes.context_parallel import blocks as cp_blocks
from moetx.planning.fake_world import fake_world

__all__ = ["flash_blocks", "meta_world"]

aten = torch.ops.aten


@contextlib.contextmanager
def flash_blocks() -> Iterator[None]:
    """Context-parallel attention's block kernel as CPU ranks run it, the flash kernel (its meta
    function), not the float32 math fallback `blocks._attend` takes off CPU (meta included):
    "selective" checkpointing keeps each kernel's outputs, the flash kernel's `[B, H, S, D]`
    output and log-sum-exp but the math path's `[B, H, S, S]` scores. A module global swapped
    for the trace and restored on exit (issue 18): the branch is on the device type, which meta
    cannot pass as CPU."""
    fallback = cp_blocks._attend

    def attend(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        scale: float,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not q.is_meta:
            return fallback(q, k, v, causal, scale, mask)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu.default(
            q, k, v, 0.0, causal, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale
        )
        return out, lse

    cp_blocks._attend = attend
    try:
        yield
    finally:
        cp_blocks._attend = fallback


@contextlib.contextmanager
def meta_world(world_size: int, rank: int) -> Iterator[None]:
    """`fake_world` whose fake backend also serves `meta` tensors, in every group: ring
    CP's `batch_isend_irecv` asks its group for the backend of its tensors' device (the
    functional collectives on meta never reach a backend).

    Inside it torch runs CPU ops on one thread: a trace's only CPU work is the routing
    bookkeeping's twins (`meta_values`: e.g. a stable sort of DeepSeek-V3's 32,768 routed ids),
    and on a busy machine a parallel region waits for threads the scheduler has not run (such a
    sort took 20-80 ms instead of 0.5 ms on the shared 2-core box: a trace 0.6-1 s instead of
    0.13 s). The thread count is restored on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    _forget_meshes()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with fake_world(1):  # its checks (no group yet) and, on exit, the teardown
            dist.destroy_process_group()
            dist.init_process_group(
                "cpu:fake,meta:fake", store=FakeStore(), rank=rank, world_size=world_size
            )
            # torch leaves a per-device backend string's default backend undefined here
            # ("FAKE" plugin vs "fake"), and its teardown then warns that it cannot look for
            # hooks
            world = dist.group.WORLD
            assert world is not None
            world._set_default_backend(dist.Backend.backend_type_map["fake"])
            yield
    finally:
        torch.set_num_threads(threads)


def _forget_meshes() -> None:
    """Clear DTensor's caches of sharding decisions, which hold the meshes they were made on.

    They are keyed by `DeviceMesh` equality (ranks, layout, names; not its process groups), so
    in a later world with an equal mesh a cached output spec brought back a mesh of the world
    torn down: a collective on it named a group that no longer exists ("Could not resolve the
    process group registered under the name ..."), e.g. sequence parallelism's reduce-scatter
    in a trace with CP after traces without it.
    """
    _clear_sharding_prop_cache()  # the Python cache and the C++ fast path's
    dtensor_redistribute._gen_transform_infos.cache_clear()
    clear_redistribute_planner_cache()
