"""Tests for the synthetic MoE model family (`moetx.models`)."""

from __future__ import annotations

import attrs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.utils._python_dispatch import TorchDispatchMode

from moetx.models import (
    MoEBlock,
    MoEConfig,
    MoETransformer,
    RoutedExperts,
    TopKRouter,
    init_weights_,
    update_routing_bias_,
)

FAST = settings(deadline=None, derandomize=True, max_examples=40)

ALL_OPTIONS = MoEConfig(
    num_layers=3,
    num_dense_layers=1,
    num_shared_experts=1,
    num_mtp_layers=2,
    tie_embeddings=True,
    aux_loss_coef=0.01,
    routing_bias=True,
    score_func="sigmoid",
)


def _expert_mlp(experts: RoutedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ experts.gate_up_proj[e].double().T).chunk(2, -1)
    return (F.silu(gate) * up) @ experts.down_proj[e].double().T


@torch.no_grad()
def _naive_experts(experts, hidden, top_k_index, top_k_weights) -> torch.Tensor:
    """Per-token loop: sum over the token's k experts of weight * expert(x)."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            out[t] += float(top_k_weights[t, j]) * _expert_mlp(experts, e, hidden[t].double())
    return out


@torch.no_grad()
def _naive_moe(block: MoEBlock, hidden: torch.Tensor) -> torch.Tensor:
    """Reference MoE: per-token scores, sorted selection (ties -> lower index), weighted sum."""
    router = block.gate
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.zeros(flat.shape, dtype=torch.float64)
    for t in range(flat.shape[0]):
        logits = router.weight.float() @ flat[t].float()
        scores = logits.softmax(-1) if router.score_func == "softmax" else logits.sigmoid()
        chosen = sorted(range(router.num_experts), key=lambda e: (-float(scores[e]), e))
        chosen = chosen[: router.top_k]
        weights = [float(scores[e]) for e in chosen]
        if router.norm_topk_prob:
            weights = [w / sum(weights) for w in weights]
        for w, e in zip(weights, chosen, strict=True):
            out[t] += w * _expert_mlp(block.experts, e, flat[t].double())
        if block.shared_experts is not None:
            out[t] += block.shared_experts(flat[t]).double()
    return out.view(hidden.shape)


@st.composite
def moe_cases(draw):
    """A small MoE block (deterministically initialised) and an input for it."""
    num_experts = draw(st.integers(1, 5))
    block = MoEBlock(
        hidden_size=draw(st.sampled_from([4, 8])),
        num_experts=num_experts,
        top_k=draw(st.integers(1, num_experts)),
        expert_hidden_size=draw(st.sampled_from([2, 4])),
        num_shared_experts=draw(st.integers(0, 2)),
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        norm_topk_prob=draw(st.booleans()),
    )
    init_weights_(block, seed=draw(st.integers(0, 2**16)))
    if draw(st.booleans()):  # all scores tie: every token goes to experts 0..k-1
        with torch.no_grad():
            block.gate.weight.zero_()
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tokens = draw(st.integers(1, 10))
    hidden = torch.randn(draw(st.integers(1, 2)), tokens, block.experts.gate_up_proj.shape[2])
    return block, hidden.normal_(generator=gen)


@FAST
@given(moe_cases())
def test_moe_block_matches_per_token_loop(case):
    """The MoE block equals a naive per-token loop over each token's k experts."""
    block, hidden = case
    out, aux = block(hidden)
    torch.testing.assert_close(out.double(), _naive_moe(block, hidden), atol=1e-5, rtol=1e-5)
    assert aux.item() == 0.0


@st.composite
def routed_cases(draw):
    """Experts, tokens, and explicit routing (including one hot expert and idle experts)."""
    num_experts = draw(st.integers(1, 5))
    top_k = draw(st.integers(1, num_experts))
    tokens = draw(st.integers(1, 10))
    experts = RoutedExperts(num_experts, draw(st.sampled_from([4, 8])), 4)
    init_weights_(experts, seed=draw(st.integers(0, 100)))
    pick = st.lists(
        st.permutations(range(num_experts)).map(lambda p: p[:top_k]),
        min_size=tokens,
        max_size=tokens,
    )
    index = torch.tensor(draw(pick), dtype=torch.int64).view(tokens, top_k)
    if draw(st.booleans()):  # every (token, slot) pair on one expert
        index = torch.full_like(index, draw(st.integers(0, num_experts - 1)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 100)))
    hidden = torch.randn(tokens, experts.gate_up_proj.shape[2], generator=gen)
    weights = torch.rand(tokens, top_k, generator=gen)
    return experts, hidden, index, weights


@FAST
@given(routed_cases())
def test_routed_experts_match_loop_and_idle_experts_get_zero_grads(case):
    """Grouped experts equal the per-token loop; experts with no tokens get zero gradients."""
    experts, hidden, index, weights = case
    out = experts(hidden, index, weights)
    torch.testing.assert_close(
        out.double(), _naive_experts(experts, hidden, index, weights), atol=1e-5, rtol=1e-5
    )
    out.square().sum().backward()
    idle = torch.bincount(index.view(-1), minlength=experts.num_experts) == 0
    for param in (experts.gate_up_proj, experts.down_proj):
        assert param.grad is not None
        assert torch.count_nonzero(param.grad[idle]) == 0


@pytest.mark.parametrize("top_k", [1, 2])
def test_exact_ties_pick_the_lower_expert_index(top_k):
    """Tied scores are broken towards the lower expert index."""
    router = TopKRouter(2, 4, top_k)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]]))
    index, _, _ = router(torch.tensor([[1.0, 0.0], [1.0, 5.0]]))
    assert index.tolist() == [[1, 3][:top_k]] * 2
    zero = TopKRouter(2, 4, 3)
    with torch.no_grad():
        zero.weight.zero_()
    assert zero(torch.randn(5, 2))[0].tolist() == [[0, 1, 2]] * 5


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_routing_counts_with_bincount_never_histc():
    """Forward and backward of the full model use `bincount` and never `histc`."""
    model = MoETransformer(ALL_OPTIONS)
    ids = torch.randint(0, 64, (2, 6))
    with _OpRecorder() as rec:
        model(ids, labels=ids).loss.backward()
    assert "bincount" in rec.ops
    assert not {op for op in rec.ops if "histc" in op}


def test_meta_build_then_init_equals_eager_build():
    """`meta` build + `to_empty` + `init_weights_` gives the eager model's parameters and buffers."""
    eager = MoETransformer(ALL_OPTIONS)
    init_weights_(eager, seed=3)
    with torch.device("meta"):
        lazy = MoETransformer(ALL_OPTIONS)
    lazy.to_empty(device="cpu")
    init_weights_(lazy, seed=3)
    assert lazy.lm_head.weight is lazy.model.embed_tokens.weight
    assert eager.state_dict().keys() == lazy.state_dict().keys()
    for name, tensor in eager.state_dict().items():
        assert torch.equal(tensor, lazy.state_dict()[name]), name


def test_construction_does_not_depend_on_global_rng():
    """Two eager builds agree whatever the global RNG state."""
    torch.manual_seed(0)
    a = MoETransformer(ALL_OPTIONS)
    torch.manual_seed(1)
    b = MoETransformer(ALL_OPTIONS)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_model_forward_backward_with_every_option(dtype):
    """All options on: loss is finite and every parameter gets a gradient."""
    model = MoETransformer(attrs.evolve(ALL_OPTIONS, dtype=dtype))
    ids = torch.randint(0, 64, (2, 7))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 7, 64)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert out.aux_loss > 0
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert model(ids).loss is None


def test_logits_are_causal_and_use_given_positions():
    """A prefix's logits do not depend on later tokens; default positions are `arange(S)`."""
    model = MoETransformer(ALL_OPTIONS)
    ids = torch.randint(0, 64, (2, 8))
    full = model(ids).logits
    torch.testing.assert_close(model(ids[:, :5]).logits, full[:, :5])
    torch.testing.assert_close(model(ids, position_ids=torch.arange(8)).logits, full)
    # RoPE is relative: a uniform shift keeps the logits, a gap changes them after it.
    torch.testing.assert_close(model(ids, position_ids=torch.arange(8) + 3).logits, full)
    gapped = model(ids, position_ids=torch.tensor([0, 1, 2, 3, 9, 10, 11, 12])).logits
    torch.testing.assert_close(gapped[:, :4], full[:, :4])
    assert not torch.allclose(gapped[:, 4:], full[:, 4:])


def test_aux_loss_is_additive_over_batch_rows():
    """The mean of the aux losses of two equal batch halves equals the full batch's."""
    block = MoEBlock(8, 4, 2, 4, aux_loss_coef=0.1, score_func="sigmoid")
    init_weights_(block, seed=1)
    hidden = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(0))
    _, full = block(hidden)
    _, first = block(hidden[:2])
    _, second = block(hidden[2:])
    assert full > 0
    torch.testing.assert_close((first + second) / 2, full)


def test_load_counter_and_bias_update():
    """`expert_load` counts (token, slot) pairs; `update_routing_bias_` applies the sign rule."""
    block = MoEBlock(8, 4, 2, 4, routing_bias=True)
    init_weights_(block, seed=2)
    flat = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    index, _, _ = block.gate(flat)
    load = block.gate.expert_load
    assert load is not None and load.dtype == torch.int64
    counts = torch.bincount(index.view(-1), minlength=4)
    assert torch.equal(load, counts)
    update_routing_bias_(block, rate=0.5)
    expected = 0.5 * torch.sign(counts.float().mean() - counts.float())
    assert torch.equal(block.gate.e_score_correction_bias, expected)
    assert int(load.sum()) == 0


@pytest.mark.parametrize("impl", [CheckpointImpl.NO_REENTRANT, CheckpointImpl.REENTRANT])
def test_checkpoint_recomputation_does_not_count_twice(impl):
    """Recomputing a checkpointed block in backward leaves `expert_load` unchanged."""
    config = attrs.evolve(ALL_OPTIONS, num_mtp_layers=0)
    model = MoETransformer(config)
    model.model.layers[1] = checkpoint_wrapper(model.model.layers[1], checkpoint_impl=impl)
    ids = torch.randint(0, 64, (2, 5))
    model(ids, labels=ids).loss.backward()
    loads = [int(m.expert_load.sum()) for m in model.modules() if isinstance(m, TopKRouter)]
    assert loads == [2 * 5 * config.top_k] * config.num_moe_layers


def test_selection_bias_changes_choice_but_not_weights():
    """The routing bias steers selection; weights come from the unbiased scores."""
    router = TopKRouter(2, 3, 1, routing_bias=True, norm_topk_prob=False)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]]))
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    index, weights, scores = router(torch.tensor([[1.0, 0.0]]))
    assert index.tolist() == [[2]]
    assert torch.equal(weights, scores[:, 2:])


def test_deepseek_v3_shaped_builds_on_meta():
    """The DeepSeek-V3-shaped config builds on meta with ~685B parameters."""
    with torch.device("meta"):
        model = MoETransformer(MoEConfig.deepseek_v3_shaped())
    count = sum(p.numel() for p in model.parameters())
    assert 6.0e11 < count < 7.5e11


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"num_heads": 4, "num_kv_heads": 3},
            r"`num_kv_heads` \(3\) must divide `num_heads` \(4\)",
        ),
        ({"top_k": 5}, r"`top_k` \(5\) must be at most `num_experts` \(4\)"),
        ({"num_dense_layers": 3}, r"`num_dense_layers` \(3\) must be at most `num_layers` \(2\)"),
        ({"hidden_size": 10, "num_heads": 4, "num_kv_heads": 2}, r"`hidden_size` \(10\)"),
        ({"head_dim": 3}, r"`head_dim` \(3\) must be even"),
    ],
)
def test_config_rejects_inconsistent_shapes(changes, message):
    """Cross-field constraints fail with the field names and values."""
    with pytest.raises(ValueError, match=message):
        MoEConfig(**changes)


def test_config_repr_is_valid_python():
    """`eval(repr(config)) == config`."""
    config = MoEConfig.deepseek_v3_shaped()
    assert eval(repr(config)) == config
    with pytest.raises(ValueError, match="'score_func' must be in"):
        MoEConfig(score_func="relu")
