"""A pass that refuses the model costs the planner no fake world: `TraceCache` runs the passes'
checks on the mesh's degrees first (`moetx.planning.refusal`), and the refusal, the plan and the
counts are what tracing each key found."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import attrs
import pytest
from torch import nn

from moetx import ContextParallel, ExpertParallel, MeshDegrees, ParallelMesh, TensorParallel
from moetx.core.algebra import Applied, Pipeline
from moetx.core.errors import ExpertDivisibilityError, MoetxError, PassPreconditionError
from moetx.models import MoEConfig, MoETransformer
from moetx.planning import autoplan, predict_activations, trace_cache
from moetx.planning.predict_activations import BlockTrace, trace_blocks
from moetx.planning.refusal import refusal
from moetx.planning.trace_cache import TraceCache
from moetx.testing import fake_world

# An MTP head, which ContextParallel and sequence parallelism refuse; 4 experts, which ep 3 does.
CONFIG = MoEConfig(
    vocab_size=68, hidden_size=12, num_heads=2, num_kv_heads=2, num_layers=2, num_dense_layers=1,
    num_experts=4, top_k=2, expert_hidden_size=6, num_shared_experts=1, dense_hidden_size=10,
    num_mtp_layers=1,
)  # fmt: skip
SEQ, ROWS = 16, 1
CP_REFUSES = "`MoETransformer` has a multi-token-prediction head (blocks `mtp.0.block`)"


@pytest.fixture
def worlds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each fake world a trace builds, and how it ended: "traced" or "refused"."""
    built: list[str] = []
    real = predict_activations.meta_world

    @contextlib.contextmanager
    def counted(world_size: int, rank: int) -> Iterator[None]:
        with real(world_size, rank):
            try:
                yield
            except MoetxError:
                built.append("refused")
                raise
            built.append("traced")

    monkeypatch.setattr(predict_activations, "meta_world", counted)
    return built


def _outcome(make, *args, **kwargs) -> BlockTrace | tuple[str, str, list[str]]:
    """The trace, or the refusal's kind, message and notes."""
    try:
        return make(*args, **kwargs)
    except MoetxError as e:
        return type(e).__name__, str(e), getattr(e, "__notes__", [])


def test_refused_candidates_build_no_fake_world(worlds: list[str], monkeypatch):
    """ContextParallel refuses the MTP head: the plan (fits and misses in order, the closest miss,
    considered and pruned counts, the refused line) is the plan made with every key traced, but
    no fake world is built for a refused key."""
    kwargs = dict(
        world=4, memory_per_rank=1 << 30, seq=SEQ, micro_batch=ROWS,
        passes_allowed=("cp", "ep", "ac"), ac_modes=("none", "full"),
    )  # fmt: skip
    early = autoplan(CONFIG, **kwargs)
    early_worlds = list(worlds)
    worlds.clear()
    monkeypatch.setattr(trace_cache, "refusal", lambda *args, **kwargs: None)
    traced = autoplan(CONFIG, **kwargs)

    assert early == traced
    assert len(early.refused) == 1 and early.refused[0].startswith(CP_REFUSES), early.refused
    assert early.fits and all(c.degrees.cp == 1 for c in early.fits + early.misses)
    assert set(early_worlds) == {"traced"}
    # tracing every key built a world for each refused one (cp 2 and 4, each dispatcher and
    # checkpointing mode), and the same worlds for the rest
    assert worlds.count("refused") >= 4
    assert worlds.count("traced") == len(early_worlds)


@pytest.mark.parametrize(
    ("passes", "kind"),
    [
        ((None, 1, TensorParallel(sequence_parallel=True), 2, None, 1), "PassPreconditionError"),
        ((ContextParallel(), 2, TensorParallel(), 2, ExpertParallel(), 2), "PassPreconditionError"),
        ((None, 1, None, 1, ExpertParallel(), 3), "ExpertDivisibilityError"),
    ],
    ids=["sequence-parallel-mtp", "cp-mtp-after-tp", "ep-3-of-4-experts"],
)
def test_a_refusal_equals_the_traced_refusal(worlds: list[str], passes, kind: str):
    """A refusal the checks decide from the degrees (a model-level one, and one that reads the ep
    degree) is the error `trace_blocks` raises on the built mesh: same type, message and notes;
    the cache built no world and ran no trace for it, and raises it again for the key."""
    cp, cpd, tp, tpd, ep, epd = passes
    cache = TraceCache(CONFIG, micro_batch=ROWS, seq=SEQ, experts=CONFIG.num_experts)
    got = _outcome(cache, cp, cpd, None, tp, tpd, ep, epd)
    # (a tp key also asks for the tp term at the cheap dispatcher, refused the same way)
    assert worlds == [] and cache.traced == 0 and cache.refused == (2 if tp else 1)
    assert _outcome(cache, cp, cpd, None, tp, tpd, ep, epd) == got
    assert cache.refused == (2 if tp else 1)
    whole = _outcome(
        trace_blocks, CONFIG, micro_batch=ROWS, seq=SEQ, cp=cp, cp_degree=cpd, tp=tp,
        tp_degree=tpd, ep=ep, ep_degree=epd,
    )  # fmt: skip
    assert worlds == ["refused"]
    assert got == whole and got[0] == kind, got


@attrs.frozen(kw_only=True)
class _GroupSizedCP(ContextParallel):
    """Refuses unless its cp group has 3 ranks: a check that needs the built device mesh (and
    takes any error reading it for a size of 0)."""

    def check(self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]) -> None:
        try:
            size = mesh.require(self.axis, by="_GroupSizedCP").size()
        except Exception:
            size = 0
        if size != 3:
            raise PassPreconditionError(f"a cp group of {size} ranks")


def test_a_check_that_uses_the_device_mesh_is_left_to_the_built_mesh():
    """A check that reads a device mesh (here its size, behind an `except Exception`) is not
    decided from the degrees, so it cannot refuse with a wrong answer: the built mesh says."""
    model = MoETransformer(CONFIG)
    degrees = MeshDegrees(cp=2)
    assert refusal(model, [_GroupSizedCP()], degrees) is None
    with fake_world(2):
        mesh = ParallelMesh.build(cp=2, device_type="cpu")
        with pytest.raises(PassPreconditionError, match="a cp group of 2 ranks"):
            Pipeline((_GroupSizedCP(),)).validate(model, mesh)
    # what the degrees decide, they decide as the built mesh does
    e = refusal(model, [ExpertParallel()], MeshDegrees(dp_shard=3, ep=3))
    assert isinstance(e, ExpertDivisibilityError) and "not divisible by ep degree 3" in str(e)
    assert refusal(model, [ExpertParallel()], MeshDegrees(dp_shard=2, ep=2)) is None
