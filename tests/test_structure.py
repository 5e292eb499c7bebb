"""Tests for model-structure discovery (`moetx.structure.discovery`)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from moetx.core.errors import UnknownModelStructureError
from moetx.models import MoEConfig, MoETransformer
from moetx.structure import discovery as _structure
from moetx.structure.discovery import (
    ModelStructure,
    canonical_fqn,
    discover,
    register_structure_adapter,
)

FULL = MoEConfig(
    num_layers=3, num_dense_layers=1, num_shared_experts=2, num_mtp_layers=1, tie_embeddings=True
)


def _check_fqns(model: nn.Module, structure: ModelStructure) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    for block in structure.blocks:
        assert modules[block.fqn] is block.module
        assert modules[block.attention_fqn] is block.attention
        if block.moe is not None:
            assert modules[block.moe.fqn] is block.moe.module
            assert modules[block.moe.router_fqn] is block.moe.router
            assert modules[block.moe.experts_fqn] is block.moe.experts
    params = dict(model.named_parameters())
    for fqn, param in structure.expert_parameters().items():
        assert params[fqn] is param


def test_discovers_every_part_of_a_full_model():
    """Dense, MoE and MTP blocks, shared experts, embedding, head, norm and tying are found."""
    model = MoETransformer(FULL)
    s = discover(model)
    assert [b.fqn for b in s.blocks] == [
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
        "mtp.0.block",
    ]
    assert [b.is_mtp for b in s.blocks] == [False, False, False, True]
    assert s.blocks[0].attention_fqn == "model.layers.0.self_attn"
    assert s.blocks[0].moe is None
    moe = s.blocks[1].moe
    assert moe is not None
    assert (moe.fqn, moe.router_fqn, moe.experts_fqn) == (
        "model.layers.1.mlp",
        "model.layers.1.mlp.gate",
        "model.layers.1.mlp.experts",
    )
    assert moe.shared_experts_fqn == "model.layers.1.mlp.shared_experts"
    assert moe.expert_param_names == ("gate_up_proj", "down_proj")
    assert (moe.num_experts, moe.top_k) == (4, 2)
    assert moe.counter_buffer_names == ()
    assert len(s.moe_layers()) == 3
    assert (s.embedding_fqn, s.lm_head_fqn, s.final_norm_fqn) == (
        "model.embed_tokens",
        "lm_head",
        "model.norm",
    )
    assert s.tied_embeddings
    assert len(s.expert_parameters()) == 6
    _check_fqns(model, s)


def test_records_are_hashable_by_identity():
    """Structure records hash and compare by identity (they hold modules)."""
    s = discover(MoETransformer(MoEConfig()))
    assert len({s, *s.blocks, *s.moe_layers()}) == 1 + 2 + 2
    assert s != discover(MoETransformer(MoEConfig()))


def test_dense_model_has_no_moe_layers_and_untied_head():
    """A model without MoE layers is not an error; `moe_layers()` is empty."""
    s = discover(MoETransformer(MoEConfig(num_dense_layers=2)))
    assert s.moe_layers() == ()
    assert s.expert_parameters() == {}
    assert not s.tied_embeddings


def test_unknown_model_names_what_was_looked_for():
    """A model without decoder layers raises with the class and the paths tried."""
    with pytest.raises(
        UnknownModelStructureError,
        match=r"^`Linear` has no decoder layers: looked for `model\.layers` and `layers` "
        r"\(an nn\.ModuleList\)\.$",
    ):
        discover(nn.Linear(2, 2))
    assert issubclass(UnknownModelStructureError, TypeError)


def test_block_without_attention_is_an_error():
    """A block without `self_attn` raises and names the block."""
    model = MoETransformer(MoEConfig())
    del model.model.layers[1].self_attn
    with pytest.raises(
        UnknownModelStructureError,
        match=r"`MoETransformer` block `model\.layers\.1` has no attention: "
        r"looked for `model\.layers\.1\.self_attn`\.",
    ):
        discover(model)


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(3, 4, 2))
        self.bias = nn.Parameter(torch.zeros(4))


class _SparseMoe(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(2, 3, bias=False)
        self.experts = _Experts()
        self.shared_expert = nn.Linear(2, 2)
        self.num_experts_per_tok = 1


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Identity()
        self.block_sparse_moe = _SparseMoe()


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(5, 2)
        self.layers = nn.ModuleList([_Layer()])


def test_conventions_cover_other_layouts():
    """A root-level backbone with `block_sparse_moe`, `router`, `shared_expert` is found."""
    model = _Backbone()
    s = discover(model)
    moe = s.blocks[0].moe
    assert moe is not None
    assert (moe.router_fqn, moe.num_experts, moe.top_k) == (
        "layers.0.block_sparse_moe.router",
        3,
        1,
    )
    assert moe.expert_param_names == ("w1",)
    assert moe.shared_experts_fqn == "layers.0.block_sparse_moe.shared_expert"
    assert (s.embedding_fqn, s.lm_head, s.final_norm) == ("embed_tokens", None, None)
    _check_fqns(model, s)


def test_experts_without_stacked_parameters_are_an_error():
    """Experts whose parameters have no expert dim raise with the expected count."""
    model = _Backbone()
    del model.layers[0].block_sparse_moe.experts.w1
    with pytest.raises(UnknownModelStructureError, match=r"whose dim 0 is `num_experts` \(3\)"):
        discover(model)


def test_registered_adapters_run_before_conventions(monkeypatch):
    """A registered adapter that recognises the model wins; `None` falls through."""
    monkeypatch.setattr(_structure, "_ADAPTERS", [])
    fallback = MoETransformer(MoEConfig())
    custom = discover(fallback)
    register_structure_adapter(lambda m: None)
    register_structure_adapter(lambda m: custom if isinstance(m, nn.Linear) else None)
    assert discover(nn.Linear(1, 1)) is custom
    assert discover(fallback) is not custom


def test_checkpoint_wrapped_blocks_report_inner_fqns():
    """Wrapped blocks are looked through; FQNs are the inner modules' `named_modules` names."""
    model = MoETransformer(FULL)
    model.model.layers[1] = checkpoint_wrapper(model.model.layers[1])
    model.mtp[0].block = checkpoint_wrapper(model.mtp[0].block)
    s = discover(model)
    assert s.blocks[1].fqn == "model.layers.1._checkpoint_wrapped_module"
    assert s.blocks[3].fqn == "mtp.0.block._checkpoint_wrapped_module"
    assert canonical_fqn(s.blocks[1].fqn) == "model.layers.1"
    assert s.blocks[1].moe is not None
    _check_fqns(model, s)


def test_works_on_meta_deepseek_v3_shape():
    """Discovery needs no data: it works on a meta-built DeepSeek-V3-shaped model."""
    with torch.device("meta"):
        model = MoETransformer(MoEConfig.deepseek_v3_shaped())
    s = discover(model)
    assert len(s.blocks) == 62
    assert len(s.moe_layers()) == 59
    assert s.moe_layers()[0].shared_experts is not None
    assert s.moe_layers()[0].counter_buffer_names == ("gate.expert_load",)
    assert (s.moe_layers()[0].num_experts, s.moe_layers()[0].top_k) == (256, 8)


def test_works_after_fully_shard():
    """After FSDP2 swaps classes and makes DTensor params, discovery is unchanged."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = MoETransformer(FULL)
        before = discover(model)
        mesh = init_device_mesh("cpu", (2,))
        for moe in before.moe_layers():
            fully_shard(moe.module, mesh=mesh)
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(model.model.layers[1].mlp).__name__ == "FSDPMoEBlock"
        after = discover(model)
        assert [b.fqn for b in after.blocks] == [b.fqn for b in before.blocks]
        params = after.expert_parameters()
        assert params.keys() == before.expert_parameters().keys()
        assert all(isinstance(p, DTensor) for p in params.values())
        assert after.moe_layers()[0].num_experts == 4
    finally:
        dist.destroy_process_group()
        torch._C._clear_DTensor_sharding_propagator_cache()
