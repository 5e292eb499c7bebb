"""Hugging Face transformers MoE models, parallelized as they are (GitHub issue 9).

Tiny random models of each family (`moetx.testing.hf`) go through `ExpertParallel | ... | FSDP`
on real gloo ranks and must train like the unparallelized HF model in one process: loss and
every gradient at every step, then the parameters after 3 AdamW steps. A DCP checkpoint of the
parallel model loads into a fresh HF model that `save_pretrained`/`from_pretrained` round-trip.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any

import attrs
import pytest
import torch
import torch.distributed.checkpoint as dcp

import moetx.structure.hf
from moetx import FSDP, ActivationCheckpoint, ExpertParallel, ParallelMesh
from moetx.core.errors import NoMoELayersError, UnknownModelStructureError
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import MoEConfig, MoETransformer
from moetx.structure.discovery import discover
from moetx.structure.hf import hf_structure
from moetx.testing import compare, fake_world, gradients
from moetx.testing.hf import (
    FAMILIES,
    HFSpec,
    build_model,
    global_batches,
    model_class,
    reference,
    tiny_config,
)
from moetx.testing.train import mean_losses
from tests.bodies.hf import eval_batch, hf_rank_train, hf_round_trip

# moetx.testing.hf and the rank bodies import transformers only when a model is built.
pytest.importorskip(
    "transformers", reason="needs Hugging Face transformers>=5 (`pip install -e .[hf]`)"
)

ATOL, RTOL = 1e-5, 1e-4

# Families trained on ranks (OLMoE is laid out like Qwen3-MoE: discovery only, to save time).
RANK_FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")

# `ActivationCheckpoint` mode per family on ranks: router mode where routers change their saved
# top-k weights in place (Mixtral, DeepSeek-V3), selective where the experts add their bias in
# place to a saved `_grouped_mm` (gpt-oss); both modes for every family in one process
# (`test_router_and_selective_checkpointing_survive_in_place_ops`).
AC_MODE = {
    "qwen3_moe": "router",
    "mixtral": "router",
    "deepseek_v3": "router",
    "gpt_oss": "selective",
}


def assert_training_parity(spec: HFSpec, results: list[dict[str, Any]], data_ranks: int) -> None:
    """Mean rank loss, every gradient of every step and the final parameters match one process."""
    ref = reference(spec, data_ranks)
    for step, (got, want) in enumerate(zip(mean_losses(results), ref["losses"], strict=True)):
        compare({"loss": want}, {"loss": got}, atol=ATOL, rtol=RTOL, what=f"loss at step {step}")
    for r, res in enumerate(results):
        for step in range(spec.steps):
            compare(
                ref["grads"][step],
                res["grads"][step],
                atol=ATOL,
                rtol=RTOL,
                what=f"rank {r} gradients at step {step}",
            )
        compare(ref["params"], res["params"], atol=ATOL, rtol=RTOL, what=f"rank {r} parameters")
    keys = sorted(build_model(spec).state_dict())
    assert all(res["state_dict_keys"] == keys for res in results)


# ------------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("family", FAMILIES)
def test_discovers_every_part_without_editing_the_model(family: str):
    """Blocks, attention, router, routed and shared experts, embedding, head: HF's own names."""
    model = build_model(HFSpec(family=family))
    s = discover(model)
    config = model.config
    dense = {"deepseek_v3": 1}.get(family, 0)
    assert [b.fqn for b in s.blocks] == [
        f"model.layers.{i}" for i in range(config.num_hidden_layers)
    ]
    assert all(b.attention_fqn == f"{b.fqn}.self_attn" for b in s.blocks)
    assert all(b.moe is None for b in s.blocks[:dense])
    router = "router" if family == "gpt_oss" else "gate"
    for block in s.blocks[dense:]:
        moe = block.moe
        assert moe is not None
        assert (moe.fqn, moe.router_fqn, moe.experts_fqn) == (
            f"{block.fqn}.mlp",
            f"{block.fqn}.mlp.{router}",
            f"{block.fqn}.mlp.experts",
        )
        assert (moe.num_experts, moe.top_k) == (4, 2)
        biases = ("gate_up_proj_bias", "down_proj_bias") if family == "gpt_oss" else ()
        assert set(moe.expert_param_names) == {"gate_up_proj", "down_proj", *biases}
        shared = f"{block.fqn}.mlp.shared_experts" if family == "deepseek_v3" else None
        assert moe.shared_experts_fqn == shared
    assert (s.embedding_fqn, s.lm_head_fqn, s.final_norm_fqn) == (
        "model.embed_tokens",
        "lm_head",
        "model.norm",
    )
    assert not s.tied_embeddings


def test_adapter_leaves_other_models_to_the_conventions():
    """moetx's own models are not HF models: the adapter answers None for them."""
    assert hf_structure(MoETransformer(MoEConfig())) is None


def test_registering_the_adapter_never_imports_transformers():
    """The adapter module imports nothing from transformers (it recognises models by class)."""
    tree = ast.parse(inspect.getsource(moetx.structure.hf))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(str(name).partition(".")[0] == "transformers" for name in imported)


def test_unknown_moe_family_names_the_experts_it_cannot_place():
    """Experts moved out of `mlp` (a layout moetx does not know) are named, never taken as dense."""
    model = build_model(HFSpec(family="qwen3_moe"))
    for layer in model.model.layers:
        layer.mlp.moe_experts = layer.mlp.experts
        del layer.mlp.experts
    with pytest.raises(UnknownModelStructureError) as info:
        discover(model)
    lines = str(info.value).splitlines()
    assert lines[0] == (
        "The Hugging Face `qwen3_moe` model `Qwen3MoeForCausalLM` has experts that are not in any "
        "MoE layer moetx knows: `model.layers.0.mlp.moe_experts` (`Qwen3MoeExperts`), "
        "`model.layers.1.mlp.moe_experts` (`Qwen3MoeExperts`)."
    )
    assert lines[1] == (
        "  looked for: in each block `model.layers.<i>`, an `mlp` or `block_sparse_moe` child "
        "with an `experts` child and a `gate` or `router` child."
    )
    assert lines[-1].startswith("  fix: register a structure adapter")


def test_unknown_layout_names_the_model_type():
    """An HF model without `model.layers` (GPT-2: `transformer.h`) says what moetx looked for."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(UnknownModelStructureError) as info:
        discover(model)
    lines = str(info.value).splitlines()
    assert lines[0] == (
        "`GPT2LMHeadModel` has no decoder layers: looked for `model.layers` and `layers` "
        "(an nn.ModuleList)."
    )
    assert lines[1].startswith("  model: a Hugging Face `gpt2` model `GPT2LMHeadModel`;")


def test_dense_hf_model_has_no_moe_layers_for_expert_parallel():
    """A tiny Llama is discovered as dense; `ExpertParallel` refuses it before touching it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    assert [b.moe for b in discover(model).blocks] == [None, None]
    with fake_world(2):
        mesh = ParallelMesh.build(ep=2)
        with pytest.raises(NoMoELayersError, match=r"^`LlamaForCausalLM` has no MoE layers"):
            ExpertParallel().apply(model, mesh)


# ------------------------------------------------------------------- checkpointing, 1 process

# Routers and experts that change a tensor in place after an op whose output the router and
# selective modes save (torch's SAC alone raises "Tensor cached during selective activation
# checkpoint has been mutated" in backward, or gives wrong gradients when told to allow it):
# Mixtral's and Qwen3-MoE's `top_k_weights /= sum` after `topk` (Qwen3 with `norm_topk_prob`,
# Qwen3-30B-A3B's setting), DeepSeek-V3's `group_mask.scatter_` and `/=` after `gather`, and the
# grouped_mm experts' `out.add_(bias)` (gpt-oss) after the saved `_grouped_mm`.
IN_PLACE_CASES = (
    HFSpec(family="mixtral", steps=1),
    HFSpec(family="qwen3_moe", steps=1, overrides=(("norm_topk_prob", True),)),
    HFSpec(family="deepseek_v3", steps=1),
    HFSpec(family="gpt_oss", steps=1),
)


def _nonzero_model(spec: HFSpec) -> torch.nn.Module:
    """`build_model(spec)` with its all-zero parameters (gpt-oss's expert and attention biases)
    filled with random values, so that an in-place bias add replayed twice shows."""
    model = build_model(spec)
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(0.2 * torch.randn(param.shape, generator=g, dtype=param.dtype))
    return model


@pytest.mark.parametrize("mode", ["router", "selective"])
@pytest.mark.parametrize("spec", IN_PLACE_CASES, ids=lambda s: s.family)
def test_router_and_selective_checkpointing_survive_in_place_ops(spec: HFSpec, mode: str):
    """`ActivationCheckpoint(mode)` in one process: bitwise the loss and gradients without AC."""
    ids, labels = global_batches(spec, 1)[0]
    plain = _nonzero_model(spec)
    loss = plain(ids, labels=labels).loss
    loss.backward()
    with fake_world(1):
        model = ActivationCheckpoint(mode=mode).apply(_nonzero_model(spec), ParallelMesh.build())
        got = model(ids, labels=labels).loss
        got.backward()
    compare(
        {"loss": loss, "grads": gradients(plain)},
        {"loss": got, "grads": gradients(model)},
        atol=0.0,
        rtol=0.0,
        what=f"{spec.family}, {mode} mode",
    )


# ------------------------------------------------------------------------ parity on gloo ranks


@pytest.mark.parametrize("family", RANK_FAMILIES)
def test_ep_ac_fsdp_train_like_one_process_on_2_ranks(pool2, family: str):
    """ep=2 on 2 ranks (ep = world size), checkpointed blocks: 3 AdamW steps match one process."""
    spec = HFSpec(family=family)
    pipeline = ExpertParallel() | ActivationCheckpoint(mode=AC_MODE[spec.family]) | FSDP()
    degrees = MeshDegrees(dp_shard=2, ep=2)
    assert_training_parity(spec, pool2.run(hf_rank_train, spec, pipeline, degrees), 2)


@pytest.mark.parametrize("family", RANK_FAMILIES)
def test_ep_fsdp_train_like_one_process_on_4_ranks(pool4, family: str):
    """ep=2 x ep_shard=2 on 4 ranks (experts FSDP-sharded too): 3 AdamW steps match one process."""
    spec = HFSpec(family=family)
    degrees = MeshDegrees(dp_shard=4, ep=2)
    results = pool4.run(hf_rank_train, spec, ExpertParallel() | FSDP(), degrees)
    assert_training_parity(spec, results, 4)


# ------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_dcp_checkpoint_becomes_a_save_pretrained_model(pool2, tmp_path, family: str):
    """Parallel train step -> DCP save -> fresh HF model -> save/from_pretrained: same logits.

    The ranks run HF's eager experts loop (the parity tests run the default grouped_mm), the
    reloaded model the default: the experts' implementation does not change the model.
    """
    spec = HFSpec(family=family, steps=1, overrides=(("experts_implementation", "eager"),))
    pipeline = ExpertParallel() | ActivationCheckpoint(mode="full") | FSDP()
    checkpoint = tmp_path / "dcp"
    results = pool2.run(
        hf_round_trip, spec, pipeline, MeshDegrees(dp_shard=2, ep=2), str(checkpoint)
    )
    keys = sorted(build_model(spec).state_dict())
    assert all(r["state_dict_keys"] == keys for r in results)
    full = results[0]["full_state_dict"]
    assert sorted(full) == keys

    fresh = build_model(attrs.evolve(spec, seed=spec.seed + 1))  # other values: loading must matter
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(checkpoint))  # no process group here: a local load
    fresh.load_state_dict(state)
    compare(full, fresh.state_dict(), atol=0, rtol=0, what="DCP checkpoint vs full state dict")
    fresh.save_pretrained(tmp_path / "hf")
    loaded = model_class(family).from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        logits = loaded(eval_batch(spec)).logits
    for r, res in enumerate(results):
        compare(
            {"logits": res["logits"]},
            {"logits": logits},
            atol=ATOL,
            rtol=RTOL,
            what=f"rank {r} parallel logits vs from_pretrained",
        )


def test_tiny_configs_are_moe_and_small():
    """Guard the fixtures: 4 experts, 2 per token, hidden 16, no aux loss in the HF loss."""
    for family in FAMILIES:
        config = tiny_config(family)
        assert (config.hidden_size, config.num_experts_per_tok) == (16, 2)
        assert config.output_router_logits is False
