"""`ContextParallel` on unmodified Hugging Face models (GitHub issue 14).

CP selects moetx's attention function in transformers' `AttentionInterface` for the parallelized
model only. Tiny models of each family train on real gloo ranks like the unparallelized model in
one process (loss, every gradient every step, parameters after 3 AdamW steps) with labels that
hold uneven `-100` spans, through the batch recipe of `tests/bodies/hf_context_parallel.py`;
what CP cannot compute (gpt-oss's sinks and sliding windows, padding masks, ...) is refused with
a typed error naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from moetx import FSDP, ActivationCheckpoint, ExpertParallel, ParallelMesh
from moetx.core.errors import ContextParallelInputError, UnsupportedAttentionError
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.passes.context_parallel.api import ContextParallel
from moetx.passes.context_parallel.hf import HF_ATTENTION
from moetx.testing import compare, fake_world
from moetx.testing.hf import HFSpec, build_model
from moetx.testing.train import assert_matches_reference
from tests.bodies import hf_context_parallel as bodies

pytest.importorskip(
    "transformers", reason="needs Hugging Face transformers>=5 (`pip install -e .[hf]`)"
)

TOL = {"atol": 1e-5, "rtol": 1e-4}
AC_MODE = {"qwen3_moe": "router", "mixtral": "router", "deepseek_v3": "router"}


def reference(spec: HFSpec, data_ranks: int) -> dict[str, Any]:
    """One process, the HF model's own loss: `model(ids, labels=labels)` (HF shifts)."""
    batches = bodies.masked_batches(spec, data_ranks * spec.rows_per_rank)
    return bodies.train_hf(build_model(spec), list(batches), spec.lr)


# ------------------------------------------------------------------------ parity on gloo ranks


@pytest.mark.parametrize(
    ("family", "comm"),
    [("qwen3_moe", "allgather"), ("mixtral", "p2p"), ("deepseek_v3", "p2p")],
)
def test_cp_fsdp_trains_like_one_process(pool2, family: str, comm: str):
    """cp=2 on 2 ranks: `ContextParallel() | FSDP()` trains like the HF model in one process."""
    spec = HFSpec(family=family)
    pipeline = ContextParallel(comm=comm) | FSDP()
    results = pool2.run(bodies.hf_cp_rank_train, spec, pipeline, MeshDegrees(cp=2))
    assert_matches_reference(results, reference(spec, 1), **TOL)
    assert all(r["state_dict_keys"] == sorted(build_model(spec).state_dict()) for r in results)


@pytest.mark.parametrize(
    ("family", "comm"),
    [("qwen3_moe", "p2p"), ("mixtral", "allgather"), ("deepseek_v3", "allgather")],
)
def test_cp_ep_ac_fsdp_trains_like_one_process(pool4, family: str, comm: str):
    """cp=2 x ep=2 on 4 ranks (two data groups): the whole pipeline trains like one process."""
    spec = HFSpec(family=family)
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
    """Missing positions, or positions with gaps (HF would mask them as packed sequences)."""
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


def test_gpt_oss_sinks_and_sliding_windows_are_refused_at_check_time():
    """gpt-oss: every layer has sinks, every other one a sliding window; nothing changes."""
    model = build_model(HFSpec(family="gpt_oss"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with fake_world(2):
        mesh = ParallelMesh.build(cp=2)
        with pytest.raises(UnsupportedAttentionError) as info:
            (ContextParallel() | FSDP()).apply(model, mesh)
    lines = str(info.value).splitlines()
    assert lines[:2] == [
        "`model.layers.0.self_attn` (`GptOssAttention`) in block `model.layers.0` cannot be made "
        "context-parallel: it uses a `sliding_attention` layer (only `full_attention` is "
        "sharded), which moetx's context-parallel attention does not compute.",
        "`model.layers.1.self_attn` (`GptOssAttention`) in block `model.layers.1` cannot be made "
        "context-parallel: it uses attention sinks (`sinks`, passed as `s_aux`), which moetx's "
        "context-parallel attention does not compute.",
    ]
    assert lines[-1].startswith("  fix: use a model whose every layer is full causal attention")
    assert model.config._attn_implementation == "eager"
    compare(before, model.state_dict(), atol=0, rtol=0, what="state dict after the refusal")


@pytest.mark.parametrize(
    ("family", "overrides", "feature"),
    [
        ("mixtral", (("sliding_window", 4),), r"a sliding window \(`sliding_window=4`\)"),
        ("qwen3_moe", (("attention_dropout", 0.1),), r"attention dropout \(`attention_dropout"),
    ],
)
def test_other_unsupported_attention_features_are_refused(family, overrides, feature):
    """Mixtral's optional sliding window and attention dropout name the layer and feature."""
    model = build_model(HFSpec(family=family, overrides=overrides))
    with fake_world(2):
        mesh = ParallelMesh.build(cp=2)
        with pytest.raises(
            UnsupportedAttentionError,
            match=rf"^`model\.layers\.0\.self_attn` \(`\w+Attention`\) in block `model\.layers\.0` "
            rf"cannot be made context-parallel: it uses {feature}",
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
