"""`ActivationCheckpoint` on Hugging Face models with a KV cache (`use_cache=True`), no CP.

Suspected: the checkpointed decoder layer appends its K/V to HF's `DynamicCache` in forward and
again when backward recomputes it. One process is enough (checkpointing issues no collectives):
each mode against the same model without checkpointing, for the cache after one forward, the
logits of a cached decode step, greedy generation, and a training step that keeps the cache on.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moetx import ActivationCheckpoint, ParallelMesh
from moetx.passes.activation_checkpoint.api import MODES
from moetx.testing import compare, fake_world, gradients
from moetx.testing.hf import HFSpec, build_model, global_batches

pytest.importorskip(
    "transformers", reason="needs Hugging Face transformers>=5 (`pip install -e .[hf]`)"
)

SPEC = HFSpec(family="qwen3_moe", overrides=(("use_cache", True),))


def _checkpointed(mode: str) -> Any:
    with fake_world(1):
        return ActivationCheckpoint(mode=mode).apply(build_model(SPEC), ParallelMesh.build())


def _cache_lengths(cache: Any) -> list[int]:
    return [cache.get_seq_length(i) for i in range(len(cache.layers))]


@pytest.mark.parametrize("mode", MODES)
def test_cache_after_forward_and_generation_match_one_process(mode: str):
    """After one forward the cache holds each layer's K/V once (the prompt length), bitwise the
    uncheckpointed model's; a cached decode step's logits and 4 greedy tokens match."""
    ids, _ = global_batches(SPEC, 1)[0]
    plain, model = build_model(SPEC), _checkpointed(mode)
    want, got = plain(ids), model(ids)
    assert got.past_key_values is not None
    assert _cache_lengths(got.past_key_values) == [ids.shape[1]] * SPEC.config().num_hidden_layers
    for a, b in zip(want.past_key_values.layers, got.past_key_values.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    nxt = want.logits[:, -1:].argmax(-1)
    step_want = plain(nxt, cache=want.past_key_values).logits
    step_got = model(nxt, cache=got.past_key_values).logits
    compare({"logits": step_want}, {"logits": step_got}, atol=0.0, rtol=0.0, what=mode)
    with torch.no_grad():
        gen_want = plain.generate(ids, max_new_tokens=4, do_sample=False)
        gen_got = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen_want, gen_got)


@pytest.mark.parametrize("mode", MODES)
def test_training_with_the_cache_on_matches_one_process(mode: str):
    """Forward and backward with `use_cache=True`: the recomputation does not append to the
    cache again (each layer still holds the prompt once; before, checkpointed layers held it
    twice), the loss and every gradient are bitwise the uncheckpointed model's, and so are the
    logits of a decode step on the cache afterwards."""
    ids, labels = global_batches(SPEC, 1)[0]
    plain, model = build_model(SPEC), _checkpointed(mode)
    want, got = plain(ids, labels=labels), model(ids, labels=labels)
    want.loss.backward()
    got.loss.backward()
    assert _cache_lengths(got.past_key_values) == _cache_lengths(want.past_key_values)
    compare(
        {"loss": want.loss, "grads": gradients(plain)},
        {"loss": got.loss, "grads": gradients(model)},
        atol=0.0,
        rtol=0.0,
        what=mode,
    )
    nxt = want.logits[:, -1:].argmax(-1)
    with torch.no_grad():
        step_want = plain(nxt, cache=want.past_key_values).logits
        step_got = model(nxt, cache=got.past_key_values).logits
    compare({"logits": step_want}, {"logits": step_got}, atol=0.0, rtol=0.0, what=mode)
