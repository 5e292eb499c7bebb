"""`ContextParallel` on unmodified Hugging Face models (GitHub issue 14).

CP selects moetx's attention function in transformers' `AttentionInterface` for the parallelized
model only. Tiny models of each family train on real gloo ranks like the unparallelized model in
one process (loss, every gradient every step, parameters after 3 AdamW steps) with labels that
hold uneven `-100` spans, through the batch recipe of `tests/bodies/hf_context_parallel.py`;
what CP cannot compute (gpt-oss's sinks and sliding windows, padding masks, ...) is refused with
a typed error naming it.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import moetx.passes.context_parallel.hf
import moetx.passes.context_parallel.hf_aux
from moetx import FSDP, ActivationCheckpoint, ExpertParallel, ParallelMesh
from moetx.core.errors import (
    ContextParallelInputError,
    PassPreconditionError,
    UnsupportedAttentionError,
)
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.passes.context_parallel.api import ContextParallel
from moetx.passes.context_parallel.blocks import (
    _attend,
    _attend_backward,
    _attend_backward_math,
    _attend_math,
)
from moetx.passes.context_parallel.hf import HF_ATTENTION
from moetx.passes.context_parallel.hf_aux import AuxLossReducer
from moetx.testing import compare, fake_world
from moetx.testing.hf import HFSpec, build_model
from moetx.testing.train import assert_matches_reference
from tests.bodies import hf_context_parallel as bodies

pytest.importorskip(
    "transformers", reason="needs Hugging Face transformers>=5 (`pip install -e .[hf]`)"
)

TOL = {"atol": 1e-5, "rtol": 1e-4}
AC_MODE = {
    "qwen3_moe": "router",
    "mixtral": "router",
    "deepseek_v3": "router",
    "gpt_oss": "selective",
}
# Mixtral with its optional sliding window, 3 tokens: it cuts cp chunks of 2 unevenly.
MIXTRAL_WINDOW = (("sliding_window", 3),)
# DeepSeek-V3 with as many K/V heads as query heads (as its real config): HF's own SDPA path
# repeats its (already per-head) K/V again when the value head dim differs and there are fewer.
MLA = (("num_key_value_heads", 2),)
# HF's router aux loss on (a product of whole-sequence means, reduced over cp by `hf_aux`).
AUX = (("output_router_logits", True), ("router_aux_loss_coef", 0.1))


def reference(spec: HFSpec, data_ranks: int) -> dict[str, Any]:
    """One process, the HF model's own loss: `model(ids, labels=labels)` (HF shifts)."""
    batches = bodies.masked_batches(spec, data_ranks * spec.rows_per_rank)
    return bodies.train_hf(build_model(spec), list(batches), spec.lr)


# ------------------------------------------------------------------------ parity on gloo ranks


@pytest.mark.parametrize(
    ("family", "comm", "overrides"),
    [
        ("qwen3_moe", "allgather", ()),
        ("mixtral", "p2p", ()),
        ("mixtral", "allgather", MIXTRAL_WINDOW),
        ("deepseek_v3", "p2p", ()),
        ("gpt_oss", "allgather", ()),
        ("qwen3_moe", "p2p", AUX),
        ("gpt_oss", "p2p", AUX),
        ("deepseek_v3", "allgather", (*MLA, ("v_head_dim", 4))),
        ("deepseek_v3", "p2p", (*MLA, ("v_head_dim", 12))),
    ],
    ids=[
        "qwen3_moe",
        "mixtral",
        "mixtral-window",
        "deepseek_v3",
        "gpt_oss",
        "qwen3_moe-aux",
        "gpt_oss-aux",
        "deepseek_v3-v_dim_4",
        "deepseek_v3-v_dim_12",
    ],
)
def test_cp_fsdp_trains_like_one_process(pool2, family: str, comm: str, overrides: Any):
    """cp=2 on 2 ranks: `ContextParallel() | FSDP()` trains like the HF model in one process
    (gpt-oss: attention sinks on every layer, a sliding window of 4 on every other one; `-aux`:
    HF's router aux loss in the loss, over the whole sequences; DeepSeek-V3's MLA with a value
    head dim below and above the q/k head dim of 8, and its own `scaling`)."""
    spec = HFSpec(family=family, overrides=overrides)
    pipeline = ContextParallel(comm=comm) | FSDP()
    results = pool2.run(bodies.hf_cp_rank_train, spec, pipeline, MeshDegrees(cp=2))
    assert_matches_reference(results, reference(spec, 1), **TOL)
    assert all(r["state_dict_keys"] == sorted(build_model(spec).state_dict()) for r in results)


@pytest.mark.parametrize(
    ("family", "comm"),
    [
        ("qwen3_moe", "p2p"),
        ("mixtral", "allgather"),
        ("deepseek_v3", "allgather"),
        ("gpt_oss", "p2p"),
    ],
)
def test_cp_ep_ac_fsdp_trains_like_one_process(pool4, family: str, comm: str):
    """cp=2 x ep=2 on 4 ranks (two data groups): the whole pipeline trains like one process.

    `use_cache=True`, as in real configs: a KV cache would make each checkpointed block's
    recompute append its K/V a second time; CP turns the model's cache off.
    """
    spec = HFSpec(family=family, overrides=(("use_cache", True),))
    pipeline = (
        ContextParallel(comm=comm)
        | ExpertParallel()
        | ActivationCheckpoint(mode=AC_MODE[family])
        | FSDP()
    )
    degrees = MeshDegrees(dp_shard=2, cp=2, ep=2)
    results = pool4.run(bodies.hf_cp_rank_train, spec, pipeline, degrees)
    assert_matches_reference(results, reference(spec, 2), **TOL)


def test_shifting_labels_after_sharding_is_caught(pool2):
    """Shifting each rank's chunk instead of the whole sequences fails the parity check."""
    spec = HFSpec(family="qwen3_moe", steps=1)
    pipeline = ContextParallel() | FSDP()
    results = pool2.run(
        bodies.hf_cp_rank_train, spec, pipeline, MeshDegrees(cp=2), wrong_shift=True
    )
    with pytest.raises(AssertionError, match=r"loss at step 0"):
        assert_matches_reference(results, reference(spec, 1), **TOL)


@pytest.mark.parametrize("comm", ["allgather", "p2p"])
def test_only_the_parallelized_model_changes_attention(pool2, comm: str):
    """Two models built from one config object: the cp one uses moetx's attention, and both
    give the single-process logits."""
    spec = HFSpec(family="qwen3_moe")
    results = pool2.run(bodies.two_models, spec, comm)
    model = build_model(spec)
    with torch.no_grad():
        want = model(bodies.masked_batches(spec, 2)[0][0]).logits
    for r, res in enumerate(results):
        assert res["implementations"] == (HF_ATTENTION, "sdpa")
        compare(
            {"cp": want, "plain": want},
            {"cp": res["logits"], "plain": res["plain_logits"]},
            what=f"rank {r} logits",
            **TOL,
        )


def test_bad_batches_raise_on_every_rank(pool2):
    """A padding mask on one rank raises on both (no hang); so do labels without shift_labels;
    an all-ones mask is accepted."""
    results = pool2.run(bodies.bad_batch_errors, HFSpec(family="qwen3_moe"), 1)
    for res in results:
        assert res["all_ones_mask"] is None
        with pytest.raises(
            ContextParallelInputError,
            match=r"(?s)^`Qwen3MoeForCausalLM` is context-parallel and was called with:\n"
            r"  - an `attention_mask` that masks tokens \(padding is not supported under CP\): "
            r"on 1 of 2 rank\(s\)\n  fix: shift labels over the whole sequences first",
        ):
            raise res["padding"]
        with pytest.raises(
            ContextParallelInputError,
            match=r"\n  - `labels` without `shift_labels` \(HF would shift labels within each "
            r"rank's chunk\): on 2 of 2 rank\(s\)\n",
        ):
            raise res["labels"]


def test_readme_recipe_gives_the_global_loss(pool2):
    """The README's HF recipe, run as written on cp=2 x ep=2: mean rank loss = HF's own loss."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "shift_labels=" in b)
    spec = HFSpec(family="qwen3_moe", steps=1)
    losses = pool2.run(bodies.readme_recipe, spec, code, MeshDegrees(cp=2, ep=2))
    ids, labels = bodies.masked_batches(spec, spec.rows_per_rank)[0]
    with torch.no_grad():
        want = build_model(spec)(ids, labels=labels).loss
    compare({"loss": want}, {"loss": torch.stack(losses).mean()}, what="README recipe", **TOL)


# ------------------------------------------------------------------------ refusals, 1 process


def test_positions_are_required_and_must_be_contiguous():
    """Missing positions, positions with gaps (HF would mask them as packed sequences), a KV
    cache."""
    from transformers import DynamicCache  # optional dependency: importorskip'ed above

    spec = HFSpec(family="mixtral")
    with fake_world(2):
        mesh = ParallelMesh.build(cp=2)
        cp = ContextParallel()
        model = cp.apply(build_model(spec), mesh)
        ids = torch.zeros(1, 8, dtype=torch.long)
        with pytest.raises(ContextParallelInputError, match=r"  - no `position_ids` \(the model"):
            model(ids[:, :4])
        gaps = torch.arange(8) * 2
        ids_l, _, pos = cp.shard_sequence(mesh, ids, position_ids=gaps)
        with pytest.raises(
            ContextParallelInputError,
            match=r"  - `position_ids` that are not one contiguous run per row, as "
            r"`shard_sequence` makes them \(HF reads gaps as packed sequences",
        ):
            model(ids_l, position_ids=pos)
        _, _, pos = cp.shard_sequence(mesh, ids)
        with pytest.raises(
            ContextParallelInputError,
            match=r"  - a KV cache \(`cache`, `past_key_values` or `use_cache=True`\): it would hold "
            r"this rank's chunk only",
        ):
            model(ids_l, position_ids=pos, past_key_values=DynamicCache(config=model.config))


def test_other_layer_types_are_refused_at_check_time():
    """A layer type CP does not compute (chunked attention) is named; nothing changes."""
    model = build_model(HFSpec(family="gpt_oss"))
    model.config.layer_types = ["chunked_attention", "full_attention"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with fake_world(2):
        mesh = ParallelMesh.build(cp=2)
        with pytest.raises(UnsupportedAttentionError) as info:
            (ContextParallel() | FSDP()).apply(model, mesh)
    lines = str(info.value).splitlines()
    assert lines[0] == (
        "`model.layers.0.self_attn` (`GptOssAttention`) in block `model.layers.0` cannot be made "
        "context-parallel: it uses a `chunked_attention` layer (only `full_attention` and "
        "`sliding_attention` are sharded), which moetx's context-parallel attention does not "
        "compute."
    )
    assert lines[1].startswith("  why: an attention left as it is would attend to 1/cp")
    assert lines[-1].startswith(
        "  fix: use a model whose layers are full or sliding-window causal attention, without"
    )
    assert model.config._attn_implementation == "eager"
    compare(before, model.state_dict(), atol=0, rtol=0, what="state dict after the refusal")


def test_attention_dropout_is_refused_at_check_time():
    """Attention dropout names the layer and the feature."""
    model = build_model(HFSpec(family="qwen3_moe", overrides=(("attention_dropout", 0.1),)))
    with fake_world(2):
        mesh = ParallelMesh.build(cp=2)
        with pytest.raises(
            UnsupportedAttentionError,
            match=r"^`model\.layers\.0\.self_attn` \(`Qwen3MoeAttention`\) in block "
            r"`model\.layers\.0` cannot be made context-parallel: it uses attention dropout "
            r"\(`attention_dropout=0\.1`\)",
        ):
            ContextParallel().apply(model, mesh)


def test_apply_installs_cores_and_keeps_the_state_dict():
    """Each block's attention gets a cp `core`; parameters and state-dict keys stay HF's."""
    spec = HFSpec(family="deepseek_v3")
    model = build_model(spec)
    keys = sorted(model.state_dict())
    with fake_world(2):
        mesh = ParallelMesh.build(cp=2)
        ContextParallel(comm="p2p").apply(model, mesh)
        facts = ContextParallel(comm="p2p").facts(model, mesh)
    assert sorted(model.state_dict()) == keys
    assert facts["attention_cores"] == tuple(f"model.layers.{i}.self_attn.core" for i in range(3))
    assert model.config._attn_implementation == HF_ATTENTION
    assert all(layer.self_attn.config is model.config for layer in model.model.layers)


def test_math_block_kernel_matches_cpu_flash_under_a_window_mask():
    """The math block kernel (off CPU) equals the CPU flash kernel with a window's additive
    mask, a row the window empties included (its lse is -inf there, and it carries no weight)."""
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = torch.randn(4, 1, 2, 5, 8, generator=g).unbind(0)
    allowed = torch.rand(5, 5, generator=g) > 0.4
    allowed[0], allowed[1] = False, True
    mask = torch.zeros(5, 5).masked_fill(~allowed, float("-inf"))
    out, lse = _attend(q, k, v, False, 0.3, mask)
    got, got_lse = _attend_math(q, k, v, False, 0.3, mask)
    assert torch.isinf(got_lse[..., 0]).all()
    compare(
        {"out": out, "lse": lse[..., 1:]},
        {"out": got, "lse": got_lse[..., 1:]},
        what="forward",
        **TOL,
    )
    lse = lse.clone()
    lse[..., 0] = 1.0  # a merged row's lse (another block saw row 0): finite
    want = _attend_backward(dout, q, k, v, out, lse, False, 0.3, mask)
    got_b = _attend_backward_math(dout, q, k, v, out, lse, False, 0.3, mask)
    compare(dict(zip("qkv", want, strict=True)), dict(zip("qkv", got_b, strict=True)), **TOL)


def test_aux_loss_of_an_unknown_formula_is_refused():
    """An aux loss the router logits do not rebuild (another formula) is refused, not replaced."""
    model = build_model(HFSpec(family="qwen3_moe", overrides=AUX))
    ids = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = model(ids)
    output.aux_loss = output.aux_loss * 2  # what another formula could give
    with fake_world(2):
        mesh = ParallelMesh.build(cp=2)
        reducer = AuxLossReducer(model, mesh["cp"])
        with pytest.raises(
            PassPreconditionError,
            match=r"^`Qwen3MoeForCausalLM` returned a router aux loss that moetx cannot rebuild "
            r"from its router logits \(on 1 of 2 cp rank\(s\)\), so `ContextParallel` cannot "
            r"compute it over the whole sequences\.\n  fix: train without the aux loss",
        ):
            reducer(model, (ids,), {}, output)


def test_the_hf_path_never_imports_transformers():
    """moetx finds transformers' attention registry through the model's own modeling module."""
    for module in (moetx.passes.context_parallel.hf, moetx.passes.context_parallel.hf_aux):
        tree = ast.parse(inspect.getsource(module))
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not any(str(name).partition(".")[0] == "transformers" for name in imported)
