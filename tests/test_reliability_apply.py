"""Checked before anything changes, never half-applied: refusals on real gloo ranks (issue 13)."""

from __future__ import annotations

import pytest

from moetx import FSDP, MeshDegrees, PassPreconditionError, Pipeline
from moetx.models import MoEConfig
from moetx.testing.train import TrainSpec
from tests.bodies.reliability_b import try_apply

TIED = TrainSpec(config=MoEConfig(tie_embeddings=True), steps=1)


def _refused(results, error, match):
    """Every rank raised `error` matching `match`, and its model is exactly as before."""
    for rank, res in enumerate(results):
        assert res["error"] is not None, f"rank {rank} applied without error"
        name, text = res["error"]
        assert name == error, (rank, res["error"])
        with pytest.raises(Exception, match=match):
            raise Exception(text)
        assert res["changes"] == [], (rank, res["changes"])


def test_wrap_root_false_with_tied_embeddings_is_refused_before_mutation(pool2):
    """`FSDP(wrap_root=False)` would leave the tied embedding/lm-head weight a plain per-rank
    tensor that no unit reduces, so ranks diverge after one step: refused in `check`."""
    results = pool2.run(try_apply, TIED, Pipeline([FSDP(wrap_root=False)]), MeshDegrees(dp_shard=2))
    _refused(
        results,
        "PassPreconditionError",
        r"^`FSDP\(wrap_root=False\)` cannot shard the tied weight `model\.embed_tokens\.weight` "
        r"\(also `lm_head\.weight`\).*\n  fix: keep `wrap_root=True`",
    )


def test_wrap_root_false_with_tied_embeddings_is_refused_by_plan():
    """`Pipeline.plan` (apply on meta in a fake world) gives the same error, untouched model."""
    with pytest.raises(PassPreconditionError, match=r"cannot shard the tied weight"):
        Pipeline([FSDP(wrap_root=False)]).plan(TIED.config, MeshDegrees(dp_shard=2))


def test_equal_fsdp_values_behave_alike(pool2):
    """Two `FSDP` values that compare equal keep the same bytes gathered after forward (the
    int 1 used to equal `FSDP()` while FSDP2 kept every parameter gathered)."""
    from moetx import PassOptionError
    from tests.bodies.plan import gathered_after_forward

    spec = TrainSpec(config=MoEConfig(), steps=1)
    built = []
    for value in (True, False, 1):
        try:
            built.append(FSDP(reshard_after_forward=value))
        except PassOptionError:
            continue
    gathered = [
        pool2.run(gathered_after_forward, spec, Pipeline([p]), MeshDegrees(dp_shard=2))[0]
        for p in built
    ]
    assert gathered[0] == 0 < gathered[1]  # True frees, False keeps
    for i, a in enumerate(built):
        for j, b in enumerate(built):
            if a == b:
                assert (repr(a), gathered[i]) == (repr(b), gathered[j]), (a, b)
            else:
                assert repr(a) != repr(b)
