"""`predict`'s FSDP all-gather buffer estimate follows `FSDP(prefetch=N)`."""

from moetx import FSDP, ExpertParallel, MeshDegrees, Pipeline, predict
from moetx.models import MoEConfig
from moetx.planning.predict_fsdp import fsdp_units
from moetx.planning.predict_state import ModelShapes

CONFIG = MoEConfig(
    vocab_size=67, hidden_size=12, num_heads=2, num_kv_heads=1, num_layers=4, num_dense_layers=1,
    num_experts=4, top_k=2, expert_hidden_size=6, num_shared_experts=1, dense_hidden_size=10,
)  # fmt: skip


def test_transient_buffers_hold_the_unit_computing_and_those_prefetched():
    """Per-block units (`min_unit_bytes=0`): prefetch 0 and 1 hold two gathered units (FSDP2's
    implicit prefetch keeps one ahead), prefetch N holds N + 1; always the largest ones."""
    degrees = MeshDegrees(dp_shard=4, ep=2)
    shapes = ModelShapes.of(CONFIG)
    got = {}
    for n in (0, 1, 2, 3):
        pipeline = Pipeline((ExpertParallel(), FSDP(min_unit_bytes=0, prefetch=n)))
        units = fsdp_units(shapes, degrees, pipeline)
        sizes = sorted(
            (u.mesh_size * u.shard_bytes for u in units if u.mesh_size > 1 for _ in range(u.count)),
            reverse=True,
        )
        got[n] = predict(CONFIG, degrees, pipeline, seq=8).fsdp_transient
        assert got[n] == sum(sizes[: max(2, n + 1)])
    assert got[0] == got[1] < got[2] < got[3]
