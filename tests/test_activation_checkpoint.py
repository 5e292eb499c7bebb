"""`ActivationCheckpoint`: value, preconditions, names, parity per mode, routing, side effects,
activation memory, and composition with `ExpertParallel` and FSDP2 on real ranks."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.utils.checkpoint import (
    CheckpointError,
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from moetx.core.errors import (
    MoetxError,
    NoMoELayersError,
    PassAlreadyAppliedError,
    PassPreconditionError,
    UnknownModelStructureError,
)
from moetx.core.record import applied_passes, check_not_failed
from moetx.mesh.parallel_mesh import ParallelMesh
from moetx.models import MoEConfig, MoETransformer, RoutedExperts, TopKRouter
from moetx.models.config import SCORE_FUNCS
from moetx.passes.activation_checkpoint.api import (
    MODES,
    SAVED_OPS,
    ActivationCheckpoint,
    ActivationCheckpointError,
    is_checkpointed,
)
from moetx.passes.activation_checkpoint.contexts import BlockState, RouterScope, block_contexts
from moetx.planning.meter import LiveActivationMeter
from moetx.structure.discovery import discover
from moetx.testing import compare, examples, fake_world, gradients
from moetx.testing.train import TrainSpec
from tests.bodies import activation_checkpoint as bodies

EXACT: dict[str, Any] = {"atol": 0.0, "rtol": 0.0}
MODEL = MoEConfig(
    num_layers=2,
    num_dense_layers=1,
    num_experts=4,
    top_k=2,
    num_shared_experts=1,
    num_mtp_layers=1,
    aux_loss_coef=0.01,
    routing_bias=True,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run this module's single-process models on one intra-op thread, then restore.

    On the shared 2-core box, tiny ops that go parallel (the experts' `index_add_`) cost 10-50
    ms each with 2 OpenMP threads against ~10 us with one, which made this module 5x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mesh() -> Iterator[ParallelMesh]:
    """A one-rank mesh (fake process group): the pass needs a mesh but never communicates."""
    with fake_world(1):
        yield ParallelMesh.build()


def _batch(config: MoEConfig, rows: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (rows, seq + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _steps(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, n: int = 2) -> dict[str, Any]:
    """`n` forward/backward steps (gradients accumulate); outputs of the last one."""
    for _ in range(n):
        out = model(ids, labels=labels)
        out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "logits": out.logits.detach(),
        "aux": out.aux_loss.detach(),
        "grads": gradients(model),
        "loads": bodies.load_counters(model),
    }


# ------------------------------------------------------------------------------ the pass value


def test_value_semantics():
    """Repr is valid Python, equal values hash equally, `evolve` re-validates."""
    p = ActivationCheckpoint(mode="selective", every=2)
    assert eval(repr(p)) == p
    assert repr(ActivationCheckpoint()) == "ActivationCheckpoint()"
    assert repr(p) == "ActivationCheckpoint(mode='selective', every=2)"
    assert hash(p) == hash(ActivationCheckpoint(mode="selective", every=2))
    assert len({p, ActivationCheckpoint(mode="selective", every=2), ActivationCheckpoint()}) == 2
    assert attrs.evolve(p, mode="full") == ActivationCheckpoint(mode="full", every=2)
    assert ActivationCheckpoint.placement.stage == "ac"
    with pytest.raises(ValueError, match=r"must be one of 'full', 'router', 'selective'\."):
        attrs.evolve(p, mode="all")


@pytest.mark.parametrize("every", [0, -1, True, 1.0])
def test_every_must_be_a_positive_integer(every: object):
    """`every` rejects zero, negatives, bools and floats with one pinned sentence."""
    with pytest.raises(
        ValueError, match=rf"^`ActivationCheckpoint\.every` \({every!r}\) must be an int >= 1\.\n"
    ):
        ActivationCheckpoint(every=every)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- preconditions


def _untouched(model: nn.Module) -> dict[str, Any]:
    return {
        "classes": {n: type(m) for n, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "state": list(model.state_dict()),
    }


def test_router_mode_needs_an_moe_layer(mesh: ParallelMesh):
    """A dense model is rejected in router mode, before anything changes; other modes accept it."""
    model = MoETransformer(attrs.evolve(MODEL, num_dense_layers=2, num_mtp_layers=0))
    before = _untouched(model)
    with pytest.raises(
        NoMoELayersError,
        match=r'^`ActivationCheckpoint\(mode="router"\)` needs an MoE layer with a router, and '
        r"`MoETransformer` has none\.\n"
        r'  fix: use `ActivationCheckpoint\(mode="full"\)` or `mode="selective"` for a dense model\.$',
    ):
        ActivationCheckpoint().apply(model, mesh)
    assert _untouched(model) == before
    assert applied_passes(model) == ()
    check_not_failed(model)
    for mode in ("full", "selective"):
        dense = ActivationCheckpoint(mode=mode).apply(MoETransformer(model.config), mesh)
        assert all(is_checkpointed(b.module) for b in discover(dense).blocks)


def test_every_beyond_the_blocks(mesh: ParallelMesh):
    """`every` larger than the block count would checkpoint nothing: rejected, nothing changed."""
    model = MoETransformer(MODEL)
    before = _untouched(model)
    with pytest.raises(
        PassPreconditionError,
        match=r"^`ActivationCheckpoint\.every` \(4\) exceeds the number of blocks of "
        r"`MoETransformer` \(3\), so no block would be checkpointed\.\n"
        r"  fix: use `every` <= 3\.$",
    ):
        ActivationCheckpoint(every=4).apply(model, mesh)
    assert _untouched(model) == before


def test_model_without_blocks(mesh: ParallelMesh):
    """A module without decoder layers fails in structure discovery; empty layers are rejected."""
    with pytest.raises(UnknownModelStructureError, match=r"^`Linear` has no decoder layers"):
        ActivationCheckpoint(mode="full").apply(nn.Linear(2, 2), mesh)
    model = MoETransformer(attrs.evolve(MODEL, num_mtp_layers=0))
    model.model.layers = nn.ModuleList()
    with pytest.raises(
        PassPreconditionError,
        match=r"^`MoETransformer` has no transformer blocks for `ActivationCheckpoint` to "
        r"checkpoint\.$",
    ):
        ActivationCheckpoint(mode="full").apply(model, mesh)


def test_applied_once(mesh: ParallelMesh):
    """A second `ActivationCheckpoint` on the same model is rejected by the record."""
    model = ActivationCheckpoint().apply(MoETransformer(MODEL), mesh)
    with pytest.raises(PassAlreadyAppliedError, match="was already applied"):
        ActivationCheckpoint(mode="full").apply(model, mesh)


# ------------------------------------------------------------------------ names and structure


@pytest.mark.parametrize("mode", MODES)
def test_names_and_state_dict_unchanged(mesh: ParallelMesh, mode: str):
    """Parameter FQNs, state-dict keys and parameter objects are untouched; blocks change class."""
    model = MoETransformer(MODEL)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    modules = [n for n, _ in model.named_modules()]
    out = ActivationCheckpoint(mode=mode).apply(model, mesh)
    assert out is model
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_modules()] == modules
    assert all(p is params[n] for n, p in model.named_parameters())
    blocks = discover(model).blocks
    assert [b.fqn for b in blocks] == ["model.layers.0", "model.layers.1", "mtp.0.block"]
    assert {type(b.module).__name__ for b in blocks} == {"CheckpointedDecoderBlock"}
    assert all(isinstance(b.module, nn.Module) and is_checkpointed(b.module) for b in blocks)
    (entry,) = applied_passes(model)
    assert entry.pass_ == ActivationCheckpoint(mode=mode)
    assert dict(entry.facts) == {"mode": mode, "blocks": tuple(b.fqn for b in blocks)}
    model.load_state_dict(MoETransformer(MODEL).state_dict())  # still loads by the same keys


def test_every_picks_every_nth_block(mesh: ParallelMesh):
    """`every=2` checkpoints the 2nd, 4th, ... block in `discover` order (backbone, then MTP)."""
    model = MoETransformer(attrs.evolve(MODEL, num_layers=3, num_mtp_layers=1))
    ActivationCheckpoint(every=2).apply(model, mesh)
    flags = [is_checkpointed(b.module) for b in discover(model).blocks]
    assert flags == [False, True, False, True]
    assert applied_passes(model)[0].facts["blocks"] == ("model.layers.1", "mtp.0.block")


def test_saved_ops_cover_matmuls_attention_and_collectives():
    """The selective save list has the matmuls, the CPU attention kernel and the all-to-all."""
    names = {str(op) for op in SAVED_OPS}
    assert {"aten.mm.default", "aten.bmm.default", "aten.addmm.default"} <= names
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in names
    assert {
        "_c10d_functional.all_to_all_single.default",
        "_c10d_functional.wait_tensor.default",
    } <= names
    assert not any(n.startswith(("c10d.", "fsdp.")) for n in names)


# ---------------------------------------------------------------- parity with no checkpointing


@st.composite
def cases(draw: st.DrawFn, *, mode: str, ep: int = 1) -> tuple[MoEConfig, int, int, int, int]:
    """`(config, every, rows, seq_len, seed)`; router mode always gets an MoE layer."""
    num_layers = draw(st.integers(1, 3))
    mtp = draw(st.integers(0, 1))
    dense_max = num_layers if mode != "router" or mtp else num_layers - 1
    experts = ep * draw(st.integers(1, 4 // ep))
    heads = draw(st.sampled_from([1, 2]))
    config = MoEConfig(
        hidden_size=draw(st.sampled_from([8, 16])),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=draw(st.sampled_from([1, heads])),
        num_experts=experts,
        top_k=draw(st.integers(1, min(2, experts))),
        expert_hidden_size=draw(st.sampled_from([4, 8])),
        num_shared_experts=draw(st.integers(0, 1)),
        num_dense_layers=draw(st.integers(0, dense_max)),
        dense_hidden_size=16,
        score_func=draw(st.sampled_from(SCORE_FUNCS)),
        norm_topk_prob=draw(st.booleans()),
        aux_loss_coef=draw(st.sampled_from([0.0, 0.01])),
        routing_bias=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
        num_mtp_layers=mtp,
        dtype=draw(st.sampled_from(["float32", "bfloat16"])) if ep == 1 else "float32",
    )
    every = draw(st.integers(1, num_layers + mtp))
    return config, every, draw(st.integers(1, 2)), draw(st.integers(2, 8)), draw(st.integers(0, 9))


def _check_parity(mesh: ParallelMesh, mode: str, case: tuple[MoEConfig, int, int, int, int]):
    config, every, rows, seq, seed = case
    ids, labels = _batch(config, rows, seq, seed)
    expected = _steps(MoETransformer(config), ids, labels)
    model = ActivationCheckpoint(mode=mode, every=every).apply(MoETransformer(config), mesh)
    compare(expected, _steps(model, ids, labels), **EXACT, what=f"{mode} mode results")


@settings(max_examples=examples(12))
@given(case=cases(mode="full"))
def test_full_mode_matches_no_checkpointing(mesh: ParallelMesh, case):
    """Full recompute: loss, logits, every gradient and the load counters are bitwise equal."""
    _check_parity(mesh, "full", case)


@settings(max_examples=examples(12))
@given(case=cases(mode="router"))
def test_router_mode_matches_no_checkpointing(mesh: ParallelMesh, case):
    """Router-saving recompute: bitwise equal results, counters counted once per step."""
    _check_parity(mesh, "router", case)


@settings(max_examples=examples(12))
@given(case=cases(mode="selective"))
def test_selective_mode_matches_no_checkpointing(mesh: ParallelMesh, case):
    """Op-level selective recompute: bitwise equal results, counters counted once per step."""
    _check_parity(mesh, "selective", case)


# --------------------------------------------------------------------- routing during recompute


class NearTieRouter(TopKRouter):
    """A router that re-decides its nearest ties when run again during backward.

    `flip` ([T, 1], 1.0 on the chosen tokens) reflects those tokens' selection scores around
    their mean, but only while autograd runs a backward pass, i.e. in a recomputation: noise
    the size of the tokens' margins, as a non-deterministic top-k or a changed tie-break gives
    (Automodel#3140, torchtitan#3146). Forward and recomputation run the same ops.
    """

    flip: torch.Tensor

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = F.linear(hidden.float(), self.weight.float()).softmax(-1)
        selection = scores.detach()
        in_backward = float(torch._C._current_graph_task_id() != -1)
        centered = selection - selection.mean(-1, keepdim=True)
        selection = selection - (2.0 * in_backward) * centered * self.flip
        top_k_index = torch.sort(selection, dim=-1, descending=True, stable=True).indices
        top_k_index = top_k_index[:, : self.top_k]
        return top_k_index, scores.gather(-1, top_k_index).to(hidden.dtype), scores


TIE_MODEL = MoEConfig(num_layers=1, num_experts=2, top_k=1, norm_topk_prob=False)


def _near_tie_model(flip: torch.Tensor) -> MoETransformer:
    model = MoETransformer(TIE_MODEL)
    router = discover(model).moe_layers()[0].router
    router.__class__ = NearTieRouter
    router.flip = flip
    return model


def _nearest_ties(ids: torch.Tensor) -> tuple[int, int]:
    """The token closest to a tie among those choosing expert 0, and among those choosing 1."""
    model = _near_tie_model(torch.zeros(ids.numel(), 1))
    router = discover(model).moe_layers()[0].router
    seen: dict[str, torch.Tensor] = {}
    router.register_forward_hook(lambda m, args, out: seen.update(scores=out[2]))
    with torch.no_grad():
        model(ids)
    scores = seen["scores"]
    choice, margin = scores.argmax(-1), (scores[:, 0] - scores[:, 1]).abs()
    a = int(torch.where(choice == 0, margin, torch.inf).argmin())
    b = int(torch.where(choice == 1, margin, torch.inf).argmin())
    return a, b


def test_router_mode_keeps_the_routing_of_forward(mesh: ParallelMesh):
    """A recomputation that routes two near-tie tokens the other way corrupts full-recompute
    gradients silently (the per-expert token counts, hence shapes, are unchanged) and a single
    flip fails loudly; router and selective modes replay the forward's routing and match."""
    ids, labels = _batch(TIE_MODEL, 2, 8, seed=0)
    a, b = _nearest_ties(ids)
    for tokens, full_fails_loudly in (((a, b), False), ((a,), True)):
        flip = torch.zeros(ids.numel(), 1)
        flip[list(tokens)] = 1.0
        expected = _steps(_near_tie_model(flip), ids, labels, n=1)
        for mode in ("router", "selective"):
            model = ActivationCheckpoint(mode=mode).apply(_near_tie_model(flip), mesh)
            compare(expected, _steps(model, ids, labels, n=1), **EXACT, what=f"{mode}, {tokens}")
        model = ActivationCheckpoint(mode="full").apply(_near_tie_model(flip), mesh)
        if full_fails_loudly:
            with pytest.raises(CheckpointError, match="different metadata"):
                _steps(model, ids, labels, n=1)
        else:
            with pytest.raises(AssertionError, match="gradients do not match"):
                compare(expected["grads"], _steps(model, ids, labels, n=1)["grads"], **EXACT)


# -------------------------------------------------------------------------------- side effects


class EagerCountRouter(TopKRouter):
    """The moetx router without its backward guard: counts in every forward, recomputed or not."""

    def _count_load(self, top_k_index: torch.Tensor) -> None:
        assert self.expert_load is not None
        with torch.no_grad():
            counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts)
            self.expert_load.add_(counts)


class CentroidRouter(TopKRouter):
    """Also accumulates per-expert token sums with a matmul, skipped during backward.

    Its recomputation runs one `mm` fewer than its forward. torch's SAC replays saved ops by
    (op, call index) over the whole region, so with one cache every later saved `mm` (the
    experts') would be answered with the wrong tensor.
    """

    sums: torch.Tensor

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = super().forward(hidden)
        if torch._C._current_graph_task_id() == -1:
            with torch.no_grad():
                onehot = F.one_hot(out[0][:, 0], self.num_experts).to(hidden.dtype)
                self.sums.add_(onehot.T @ hidden)
        return out


def _with_router(cls: type[TopKRouter], config: MoEConfig) -> MoETransformer:
    model = MoETransformer(config)
    for layer in discover(model).moe_layers():
        layer.router.__class__ = cls
        if cls is CentroidRouter:
            layer.router.register_buffer(
                "sums", torch.zeros(config.num_experts, config.hidden_size)
            )
    return model


def test_load_counter_counts_once_per_step(mesh: ParallelMesh):
    """A counter that counts in every forward is doubled by plain checkpointing but counted
    once per step under every mode (the recomputation's increments are rolled back)."""
    ids, labels = _batch(MODEL, 2, 6, seed=3)
    expected = _steps(_with_router(EagerCountRouter, MODEL), ids, labels)
    assert all(int(load.sum()) > 0 for load in expected["loads"].values())
    for mode in MODES:
        model = ActivationCheckpoint(mode=mode).apply(_with_router(EagerCountRouter, MODEL), mesh)
        compare(expected, _steps(model, ids, labels), **EXACT, what=f"{mode} mode")

    layer = discover(_with_router(EagerCountRouter, MODEL)).moe_layers()[0]
    x = torch.randn(1, 5, MODEL.hidden_size, requires_grad=True)
    out, _ = checkpoint(layer.module, x, use_reentrant=False)
    out.sum().backward()  # plain torch checkpointing replays the counter
    load = layer.router.expert_load
    assert isinstance(load, torch.Tensor) and int(load.sum()) == 2 * 5 * MODEL.top_k


def test_router_side_effects_cannot_shift_the_replay(mesh: ParallelMesh):
    """A router that skips ops when recomputed leaves every other saved op's replay intact;
    with torch's single SAC cache the same policy replays the wrong matmuls."""
    config = attrs.evolve(MODEL, routing_bias=False)
    ids, labels = _batch(config, 2, 6, seed=4)
    expected = _steps(_with_router(CentroidRouter, config), ids, labels, n=1)
    for mode in ("router", "selective"):
        model = ActivationCheckpoint(mode=mode).apply(_with_router(CentroidRouter, config), mesh)
        compare(expected, _steps(model, ids, labels, n=1), **EXACT, what=f"{mode} mode")

    def single_cache() -> Any:
        return create_selective_checkpoint_contexts(
            lambda ctx, op, *a, **k: (
                CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE
            )
        )

    layer = discover(_with_router(CentroidRouter, config)).moe_layers()[0]
    x = torch.randn(1, 5, config.hidden_size, requires_grad=True)
    out, _ = checkpoint(layer.module, x, use_reentrant=False, context_fn=single_cache)
    with pytest.raises((RuntimeError, CheckpointError)):
        out.sum().backward()


# -------------------------------------------------------------- in-place changes of saved tensors


class InPlaceNormRouter(EagerCountRouter):
    """Normalises its top-k weights in place, as HF's Mixtral, Qwen3-MoE and DeepSeek-V3 routers
    do, after `topk` and `gather`, whose outputs router and selective modes save.

    Also DeepSeek-V3's group mask (`zeros_like`, saved, then `scatter_`), a cast that reads the
    top-k weights before they change (a replay that handed out the changed values would give
    this path other values), and its load counter counts in every forward (rolled back after a
    recomputation).
    """

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = F.linear(hidden.float(), self.weight.float()).softmax(-1)
        mask = torch.zeros_like(scores)
        mask.scatter_(1, scores.detach().topk(self.top_k, dim=-1).indices, 1.0)
        chosen = torch.topk(scores.detach() * mask, self.top_k, dim=-1).indices
        top_k_weights, top_k_index = torch.topk(scores.gather(-1, chosen), self.top_k, dim=-1)
        top_k_index = chosen.gather(-1, top_k_index)
        sharpness = top_k_weights.double().square()  # read before the in-place change
        top_k_weights /= top_k_weights.sum(-1, keepdim=True)
        top_k_weights *= (1.0 + sharpness).float()
        self._count_load(top_k_index)
        return top_k_index, top_k_weights.to(hidden.dtype), scores


class InPlaceBiasExperts(RoutedExperts):
    """Adds a per-expert bias in place to its matmul outputs, which selective mode saves, as HF's
    grouped_mm experts (gpt-oss) do with `out.add_(bias)`."""

    gate_up_bias: nn.Parameter

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        k = top_k_index.shape[1]
        flat_index = top_k_index.reshape(-1)
        order = torch.argsort(flat_index, stable=True)
        counts = torch.bincount(flat_index, minlength=self.num_experts).tolist()
        token_ids = order // k
        outputs = []
        for e, x in enumerate(torch.split(hidden[token_ids], counts)):
            h = x @ self.gate_up_proj[e].T
            h.add_(self.gate_up_bias[e])
            gate, up = h.chunk(2, dim=-1)
            outputs.append((F.silu(gate) * up) @ self.down_proj[e].T)
        weighted = torch.cat(outputs) * top_k_weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(hidden).index_add_(0, token_ids, weighted.to(hidden.dtype))


def _in_place_model(config: MoEConfig) -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(config)
    for layer in discover(model).moe_layers():
        layer.router.__class__ = InPlaceNormRouter
        experts = layer.module.get_submodule("experts")
        assert isinstance(experts, RoutedExperts)
        experts.__class__ = InPlaceBiasExperts
        bias = torch.randn(experts.gate_up_proj.shape[:2], dtype=experts.gate_up_proj.dtype)
        experts.register_parameter("gate_up_bias", nn.Parameter(bias))
    return model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_place_changes_of_saved_outputs_keep_every_mode_exact(mesh: ParallelMesh, dtype: str):
    """In-place changes, in forward, of tensors router/selective mode save (a router normalising
    its top-k weights in place, experts adding a bias in place): bitwise the results without
    checkpointing, counters counted once (the saved tensors are copied before the change)."""
    config = attrs.evolve(MODEL, dtype=dtype)
    ids, labels = _batch(config, 2, 6, seed=5)
    expected = _steps(_in_place_model(config), ids, labels)
    assert all(int(load.sum()) > 0 for load in expected["loads"].values())
    for mode in MODES:
        model = ActivationCheckpoint(mode=mode).apply(_in_place_model(config), mesh)
        compare(expected, _steps(model, ids, labels), **EXACT, what=f"{mode} mode")


def test_torch_sac_allowing_cache_mutation_gives_wrong_gradients():
    """Why moetx copies on write: torch's SAC hands the recomputation the changed tensor when
    told to allow it (`allow_cache_entry_mutation=True`), so the bias is added twice."""
    experts = discover(_in_place_model(MODEL)).moe_layers()[0].module.get_submodule("experts")
    hidden = torch.randn(6, MODEL.hidden_size, requires_grad=True)
    index = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    weights = torch.rand(6, 2)
    experts(hidden, index, weights).square().sum().backward()
    expected = {"hidden": hidden.grad, "experts": gradients(experts)}
    hidden.grad = None
    experts.zero_grad()

    def allowing_mutation() -> Any:
        ops = [torch.ops.aten.mm.default]
        return create_selective_checkpoint_contexts(ops, allow_cache_entry_mutation=True)

    out = checkpoint(
        experts, hidden, index, weights, use_reentrant=False, context_fn=allowing_mutation
    )
    out.square().sum().backward()
    with pytest.raises(AssertionError, match="gradients do not match"):
        compare(expected, {"hidden": hidden.grad, "experts": gradients(experts)}, **EXACT)


def test_selective_mode_copies_saved_dtensors_before_in_place_changes(mesh: ParallelMesh):
    """Under TP the matmuls run on DTensors, so selective mode saves DTensor outputs, which have
    no storage of their own (the cache keys and copies them by their local shard): a bias added
    in place to one must not reach the recomputation. Gradients bitwise those without
    checkpointing (the bias added twice, or an 'invalid python storage' error, otherwise)."""
    dmesh, rep = mesh["dp_shard_cp"], [Replicate()]
    torch.manual_seed(0)
    w, bias, out = (torch.randn(*shape) for shape in ((8, 4), (8,), (2, 8)))
    x = torch.randn(6, 4, requires_grad=True)
    params = [distribute_tensor(t, dmesh, rep).requires_grad_() for t in (w, bias, out)]

    def block(x: torch.Tensor) -> torch.Tensor:
        h = DTensor.from_local(x, dmesh, rep) @ params[0].T
        h.add_(params[1])  # in place on the saved `mm` output
        return (F.silu(h) @ params[2].T).to_local()

    def grads() -> dict[str, Any]:
        got = {"x": x.grad, **{str(i): p.grad.to_local() for i, p in enumerate(params)}}
        x.grad = None
        for p in params:
            p.grad = None
        return got

    block(x).square().sum().backward()
    expected = grads()
    state = BlockState("selective", RouterScope(), (), "block")
    context_fn = functools.partial(block_contexts, state)
    checkpoint(block, x, use_reentrant=False, context_fn=context_fn).square().sum().backward()
    compare(expected, grads(), **EXACT)


class ScaleInPlace:
    """A forward hook (registered after `ActivationCheckpoint`, so it runs outside the router's
    cache) that scales the router's top-k weights in place, as an MoE layer applying a routed
    scaling factor in place would."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        output[1].mul_(2.5)


class StashingRouter(TopKRouter):
    """Keeps its logits (saved by router mode, not returned) on itself for other code."""

    last_logits: torch.Tensor

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.last_logits = F.linear(hidden.float(), self.weight.float())
        return super().forward(hidden)


def test_router_outputs_changed_outside_the_router(mesh: ParallelMesh):
    """Router outputs changed in place after the router returns (where router mode watches no
    op) keep every mode exact: their saved tensors are copied when the router returns."""
    config = attrs.evolve(MODEL, routing_bias=False)
    ids, labels = _batch(config, 2, 6, seed=6)

    def build(mode: str | None) -> nn.Module:
        model: nn.Module = MoETransformer(config)
        if mode is not None:
            model = ActivationCheckpoint(mode=mode).apply(model, mesh)
        for layer in discover(model).moe_layers():
            layer.router.register_forward_hook(ScaleInPlace())
        return model

    expected = _steps(build(None), ids, labels)
    for mode in MODES:
        compare(expected, _steps(build(mode), ids, labels), **EXACT, what=f"{mode} mode")


def test_saved_tensor_changed_where_unwatched_raises(mesh: ParallelMesh):
    """A saved tensor changed where router mode watches no op (a stash of the router's, zeroed
    by its MoE layer) fails the first backward with a typed error naming the router and the
    fix, never with silently wrong gradients; selective mode watches the block: exact."""
    config = attrs.evolve(MODEL, num_mtp_layers=0, routing_bias=False)
    ids, labels = _batch(config, 2, 6, seed=7)

    def zero_stash(module: nn.Module, args: Any, output: Any) -> None:
        gate = module.get_submodule("gate")
        assert isinstance(gate, StashingRouter)
        with torch.no_grad():
            gate.last_logits.zero_()

    def build(mode: str | None) -> nn.Module:
        model: nn.Module = _with_router(StashingRouter, config)
        if mode is not None:
            model = ActivationCheckpoint(mode=mode).apply(model, mesh)
        for layer in discover(model).moe_layers():
            layer.module.register_forward_hook(zero_stash)
        return model

    expected = _steps(build(None), ids, labels, n=1)
    model = build("selective")
    compare(expected, _steps(model, ids, labels, n=1), **EXACT, what="selective mode")
    model = build("router")
    loss = model(ids, labels=labels).loss
    with pytest.raises(ActivationCheckpointError) as info:
        loss.backward()
    assert isinstance(info.value, MoetxError) and isinstance(info.value, RuntimeError)
    lines = str(info.value).splitlines()
    assert lines[0] == (
        "`model.layers.1.mlp.gate`: the output of `aten.mm.default` that `ActivationCheckpoint("
        'mode="router")` saved was changed in place where the checkpoint does not watch, so '
        "recomputing from it would give wrong gradients."
    )
    assert (
        lines[-1]
        == '  fix: use `ActivationCheckpoint(mode="full")`, or make that change out of place.'
    )


# ------------------------------------------------------------------------------------ memory

MEMORY_MODEL = MoEConfig(
    vocab_size=128,
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    num_experts=4,
    top_k=2,
    expert_hidden_size=128,
)


def _activation_bytes(mode: str | None, mesh: ParallelMesh) -> int:
    model: nn.Module = MoETransformer(MEMORY_MODEL)
    if mode is not None:
        model = ActivationCheckpoint(mode=mode).apply(model, mesh)
    ids, _ = _batch(MEMORY_MODEL, 4, 32, seed=0)
    with LiveActivationMeter(exclude=[model, ids]) as live:
        out = model(ids)
    return live.live_bytes(exclude=[out.logits])


def test_activation_bytes_order(mesh: ParallelMesh):
    """Bytes forward leaves resident: full < router <= selective < none (notes §3.5 ratios)."""
    none, full, router, selective = (
        _activation_bytes(m, mesh) for m in (None, "full", "router", "selective")
    )
    assert full < router <= selective < none
    assert full / none < 0.06 and router / none < 0.08 and selective / none < 0.7


def test_full_mode_keeps_about_the_block_inputs(mesh: ParallelMesh):
    """Per checkpointed block, full mode keeps at most ~1.1x the block's input [B, S, H]."""
    model = MoETransformer(MEMORY_MODEL)
    ActivationCheckpoint(mode="full").apply(model, mesh)
    blocks = [b.module for b in discover(model).blocks]
    hidden = torch.randn(4, 32, MEMORY_MODEL.hidden_size, requires_grad=True)
    cos_sin = model.model.rotary_emb(torch.arange(32).expand(4, 32))
    with LiveActivationMeter(exclude=[model, hidden, *cos_sin]) as live:
        h = hidden
        for block in blocks:
            h, _ = block(h, cos_sin)
    kept = live.live_bytes()  # every block's output: the next block's saved input, or `h`
    assert hidden.nbytes * len(blocks) <= kept <= 1.1 * hidden.nbytes * len(blocks)


# ---------------------------------------------------------------------------- on 2 gloo ranks

KEYS = ("loss", "logits", "grads", "loads")


def _same(results: list[dict[str, Any]], modes: tuple[str, ...], what: str) -> None:
    for rank, res in enumerate(results):
        expected = {k: res["plain"][k] for k in KEYS}
        for mode in modes:
            actual = {k: res[mode][k] for k in KEYS}
            compare(expected, actual, **EXACT, what=f"{what}, {mode} mode, rank {rank}")


@settings(max_examples=examples(5))
@given(case=cases(mode="router", ep=2))
def test_expert_parallel_matches_without_checkpointing_2_ranks(pool2, case):
    """Under `ExpertParallel` on 2 ranks every mode gives the un-checkpointed EP results."""
    config, every, rows, seq, seed = case
    spec = TrainSpec(config=config, seed=seed, rows_per_rank=rows, seq_len=seq, steps=1)
    _same(pool2.run(bodies.ep_step, spec, MODES, every), MODES, "EP")


def test_recomputed_collectives_2_ranks(pool2):
    """Full and router recomputation re-issue each MoE layer's count exchange and its two token
    all-to-alls in backward; selective mode replays them from its cache."""
    spec = TrainSpec(config=MODEL, rows_per_rank=2, seq_len=6, steps=1)
    (res, _) = pool2.run(bodies.ep_step, spec, MODES)
    moe_layers = 2  # model.layers.1 and mtp.0.block
    plain = res["plain"]["backward_collectives"]
    assert plain == {"all_to_all_single[data]": 2 * moe_layers}
    again = {"all_to_all_single[int64]": moe_layers, "all_to_all_single[data]": 4 * moe_layers}
    assert res["full"]["backward_collectives"] == again
    assert res["router"]["backward_collectives"] == again
    assert res["selective"]["backward_collectives"] == plain


def test_fully_shard_on_checkpointed_blocks_2_ranks(pool2):
    """FSDP2 `fully_shard` composes with the class swap (`FSDPCheckpointedDecoderBlock`) and
    gives the un-checkpointed FSDP results in every mode."""
    spec = TrainSpec(config=MODEL, rows_per_rank=2, seq_len=6, steps=1)
    results = pool2.run(bodies.fully_shard_step, spec, MODES)
    _same(results, MODES, "fully_shard")
    assert set(results[0]["full"]["classes"]) == {"FSDPCheckpointedDecoderBlock"}


@pytest.mark.parametrize(
    "fsdp", [{}, {"param_dtype": "bfloat16", "reduce_dtype": "float32"}], ids=["fp32", "bf16"]
)
def test_pipeline_with_expert_parallel_and_fsdp_2_ranks(pool2, fsdp: dict[str, Any]):
    """`ExpertParallel() | ActivationCheckpoint(mode) | FSDP()`: FSDP units nested in the
    checkpointed blocks (experts; the fp32 router under bf16) leave every mode exact."""
    spec = TrainSpec(config=MODEL, rows_per_rank=2, seq_len=6, steps=1)
    _same(pool2.run(bodies.pipeline_step, spec, MODES, fsdp), MODES, f"EP|AC|FSDP({fsdp})")
