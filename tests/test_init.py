"""Tests for counter-based deterministic init (`moetx.models.init`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.testing._internal.distributed.fake_pg import FakeStore

from moetx.models import MoEConfig, MoETransformer, init_weights_
from moetx.models.init import INIT_STD, _key, hashed_uniform, local_global_indices

CONFIG = MoEConfig(num_layers=2, num_dense_layers=1, num_shared_experts=1, routing_bias=True)
MASK = (1 << 64) - 1


def _splitmix64_reference(key: int, index: int) -> float:
    """Plain-Python splitmix64 on unsigned 64-bit ints."""
    z = (key + (index + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return ((z >> 40) + 0.5) * (2.0 / (1 << 24)) - 1.0


@settings(deadline=None, derandomize=True, max_examples=50)
@given(
    st.integers(-(2**63), 2**63 - 1),
    st.lists(st.integers(0, 2**62), min_size=1, max_size=8),
)
def test_hash_matches_plain_python_splitmix64(key, indices):
    """The wrapping int64 torch hash equals unsigned 64-bit splitmix64."""
    got = hashed_uniform(key, torch.tensor(indices, dtype=torch.int64)).tolist()
    assert got == [_splitmix64_reference(key, i) for i in indices]


def test_values_are_a_function_of_seed_fqn_and_global_index():
    """Element i of parameter `fqn` is `INIT_STD*sqrt(3) * hashed_uniform(key(seed, fqn), i)`."""
    model = MoETransformer(CONFIG)
    init_weights_(model, seed=7)
    fqn = "model.layers.1.mlp.experts.down_proj"
    param = model.get_parameter(fqn)
    expected = INIT_STD * math.sqrt(3) * hashed_uniform(_key(7, fqn), torch.arange(param.numel()))
    assert torch.equal(param.detach(), expected.float().view(param.shape))


def test_init_is_deterministic_and_seeded():
    """Same seed: same values; other seed: other values; norms 1, buffers 0, std ~ INIT_STD."""
    a, b = MoETransformer(CONFIG), MoETransformer(CONFIG)
    init_weights_(a, seed=1)
    init_weights_(b, seed=1)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    init_weights_(b, seed=2)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert torch.equal(a.model.norm.weight, torch.ones(16))
    router = a.model.layers[1].mlp.gate
    router.expert_load.add_(3)
    init_weights_(a, seed=1)
    assert int(router.expert_load.sum()) == 0
    assert torch.count_nonzero(router.e_score_correction_bias) == 0
    weight = a.model.embed_tokens.weight
    assert weight.abs().max() <= INIT_STD * math.sqrt(3)
    assert abs(weight.std().item() - INIT_STD) < 0.1 * INIT_STD


def test_wrappers_do_not_change_values():
    """A checkpoint-wrapped block gets the values of the unwrapped one (wrapper segments dropped)."""
    plain, wrapped = MoETransformer(CONFIG), MoETransformer(CONFIG)
    wrapped.model.layers[1] = checkpoint_wrapper(wrapped.model.layers[1])
    init_weights_(plain, seed=4)
    init_weights_(wrapped, seed=4)
    for x, y in zip(plain.parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(x, y)


def test_tied_weights_are_initialised_once():
    """Tied embeddings share one parameter, filled under the embedding's name."""
    tied = MoETransformer(MoEConfig(tie_embeddings=True))
    untied = MoETransformer(MoEConfig())
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert torch.equal(tied.model.embed_tokens.weight, untied.model.embed_tokens.weight)


def test_meta_parameters_are_rejected():
    """Initialising before `to_empty` names the parameter and the fix."""
    with torch.device("meta"):
        model = MoETransformer(CONFIG)
    with pytest.raises(ValueError, match=r"`model\.embed_tokens\.weight` is on the meta device"):
        init_weights_(model)


@contextlib.contextmanager
def _fake_rank(rank: int, world_size: int) -> Iterator[None]:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        # DTensor's sharding-propagation cache keys on meshes, and mesh equality ignores the
        # rank: without this, the next "rank" in this process gets the previous rank's mesh.
        torch._C._clear_DTensor_sharding_propagator_cache()


def _expected_chunk(full: torch.Tensor, dim: int, parts: int, index: int) -> torch.Tensor:
    chunks = full.chunk(parts, dim)
    return chunks[index] if index < len(chunks) else full.narrow(dim, 0, 0)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("placement", ["shard0", "shard_last", "replicate"])
def test_dtensor_shards_get_the_eager_values(world_size, placement):
    """Each rank's local shard of a 1-D-mesh DTensor equals the matching slice of the eager init."""
    reference = MoETransformer(CONFIG)
    init_weights_(reference, seed=5)
    full = dict(reference.named_parameters())
    for rank in range(world_size):
        with _fake_rank(rank, world_size):
            mesh = init_device_mesh("cpu", (world_size,))
            with torch.device("meta"):
                model = MoETransformer(CONFIG)
            model.to_empty(device="cpu")
            dims = {}
            for fqn, param in list(model.named_parameters()):
                dim = 0 if placement == "shard0" else param.dim() - 1
                places = [Replicate()] if placement == "replicate" else [Shard(dim)]
                shape, _ = compute_local_shape_and_global_offset(param.shape, mesh, places)
                local = torch.empty(shape)
                dt = DTensor.from_local(
                    local, mesh, places, run_check=False, shape=param.shape, stride=param.stride()
                )
                owner, _, name = fqn.rpartition(".")
                model.get_submodule(owner).register_parameter(name, nn.Parameter(dt))
                dims[fqn] = dim
            init_weights_(model, seed=5)
            for fqn, param in model.named_parameters():
                expected = full[fqn].detach()
                if placement != "replicate":
                    expected = _expected_chunk(expected, dims[fqn], world_size, rank)
                assert torch.equal(param.to_local(), expected), (rank, fqn)


def test_fsdp_over_expert_parallel_strided_shards_get_the_eager_values():
    """FSDP2 over EP-sharded experts (`_StridedShard`) fills each rank's shard with eager values."""
    from torch.distributed.fsdp import fully_shard

    reference = MoETransformer(CONFIG)
    init_weights_(reference, seed=6)
    full = dict(reference.named_parameters())
    for rank in range(4):
        with _fake_rank(rank, 4):
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
            with torch.device("meta"):
                model = MoETransformer(CONFIG)
            experts = model.model.layers[1].mlp.experts
            for name, param in list(experts.named_parameters()):
                sharded = distribute_tensor(param, mesh["ep"], [Shard(0)], src_data_rank=None)
                experts.register_parameter(name, nn.Parameter(sharded))
            fully_shard(experts, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
            model.to_empty(device="cpu")
            init_weights_(model, seed=6)
            dp, ep = mesh.get_coordinate()
            seen_strided = False
            for fqn, param in model.named_parameters():
                expected = full[fqn].detach()
                if ".experts." in fqn:
                    seen_strided = True
                    assert type(param.placements[0]).__name__ == "_StridedShard"
                    expected = expected.chunk(2)[ep].chunk(2)[dp]
                else:
                    expected = expected.chunk(2)[dp]
                assert torch.equal(param.to_local(), expected), (rank, fqn)
                # Agrees with torch's shape/first-offset bookkeeping for the same placements.
                indices = local_global_indices(param)
                shape, offset = compute_local_shape_and_global_offset(
                    param.shape, param.device_mesh, param.placements
                )
                assert tuple(len(i) for i in indices) == shape
                assert tuple(int(i.min()) for i in indices) == offset
            assert seen_strided
