"""Non-finite gradients reach `clip_grad_norm_`'s result on every rank, as in one process.

gloo's MAX all-reduce drops a NaN that sits on a rank other than 0 (TORCH-CPU-NOTES §9), so an
inf-norm built on it agreed on a finite norm while a gradient was NaN. Each example writes NaN,
inf or -inf into one shard of one dense or expert gradient on one rank, and compares the norm,
the clipped gradients and `error_if_nonfinite` with `torch.nn.utils.clip_grad_norm_` on the
same full gradients in one process.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import MoEConfig
from moetx.passes import FSDP, ExpertParallel
from moetx.testing import examples
from moetx.testing.train import TrainSpec
from moetx.training.clip import clip_grad_norm_
from tests.bodies import reliability as bodies

SPEC = TrainSpec(config=MoEConfig(num_experts=4, num_layers=2, num_dense_layers=1), steps=1)
ROWS = 8
EP_FSDP = ExpertParallel() | FSDP()
NORMS = [2.0, 1.0, math.inf, 0.5, 3.0, 0.0]
VALUES = [math.nan, math.inf, -math.inf]


def assert_like_torch(results: list[dict[str, Any]], max_norm: float, norm_type: float, err: bool):
    """Every rank: the norm (NaN/inf included), the clipped gradients and the error as torch's."""
    first = results[0]
    want = bodies.torch_clip_reference(first["before"], first["missing"], max_norm, norm_type, err)
    for rank, res in enumerate(results):
        what = f"rank {rank}, {res['target']}"
        assert ("error" in res) == ("error" in want), (what, res.get("error"), want.get("error"))
        if "error" in want:
            assert res["error"][1].startswith("The total norm of order"), (what, res["error"])
        else:
            torch.testing.assert_close(
                res["norm"], want["norm"], equal_nan=True, atol=1e-6, rtol=1e-4, msg=what
            )
        torch.testing.assert_close(
            res["after"], want["after"], equal_nan=True, atol=1e-6, rtol=1e-4, msg=what
        )


@settings(max_examples=examples(12), deadline=None)
@given(
    norm_type=st.sampled_from(NORMS),
    value=st.sampled_from(VALUES),
    on_rank=st.integers(0, 1),
    expert=st.booleans(),
    index=st.integers(0, 50),
    element=st.integers(0, 10_000),
    err=st.booleans(),
)
# The cases gloo's MAX got wrong, always run: NaN off rank 0 under the inf-norm.
@example(math.inf, math.nan, 1, True, 0, 0, False)
@example(math.inf, math.nan, 1, False, 3, 5, False)
@example(math.inf, math.nan, 1, False, 3, 5, True)
def test_nonfinite_gradient_anywhere_on_2_ranks_is_torchs(
    pool2, norm_type, value, on_rank, expert, index, element, err
):
    """EP+FSDP on 2 ranks: a NaN/inf anywhere gives torch's norm, gradients and error."""
    results = pool2.run(
        bodies.nonfinite_clip,
        SPEC,
        EP_FSDP,
        MeshDegrees(dp_shard=2, ep=2),
        expert=expert,
        index=index,
        element=element,
        on_rank=on_rank,
        value=value,
        max_norm=0.5,
        norm_type=norm_type,
        error_if_nonfinite=err,
        global_rows=ROWS,
    )
    assert_like_torch(results, 0.5, norm_type, err)


@pytest.mark.parametrize("norm_type", [math.inf, 2.0], ids=["inf", "l2"])
@pytest.mark.parametrize("expert", [True, False], ids=["expert", "dense"])
def test_nan_on_the_last_of_4_ranks_is_torchs(pool4, norm_type, expert):
    """EP (ep=2) + FSDP on 4 ranks, NaN on rank 3: every rank sees NaN (and raises when asked).

    Not HSDP: a NaN written into one replica of a replicated shard is not a gradient any
    single process could have (replicas are equal after FSDP's all-reduce).
    """
    for err in (False, True):
        results = pool4.run(
            bodies.nonfinite_clip,
            SPEC,
            EP_FSDP,
            MeshDegrees(dp_shard=4, ep=2),
            expert=expert,
            index=1,
            element=3,
            on_rank=3,
            value=math.nan,
            max_norm=0.5,
            norm_type=norm_type,
            error_if_nonfinite=err,
            global_rows=ROWS,
        )
        assert_like_torch(results, 0.5, norm_type, err)
        if not err:
            assert all(math.isnan(float(r["norm"])) for r in results)


def test_norm_type_0_is_torchs_count_in_one_process():
    """`norm_type=0` is what torch computes: how many gradients have a nonzero (or NaN) entry."""
    grads = {
        "a": torch.tensor([1.0, 0.0, 2.0]),
        "b": torch.zeros(2),
        "c": torch.tensor([0.0, math.nan]),
    }
    want = bodies.torch_clip_reference(grads, [], 0.5, 0.0, False)
    params = []
    for g in grads.values():
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    norm = clip_grad_norm_(params, 0.5, 0.0)
    assert float(want["norm"]) == float(norm) == 2.0
    torch.testing.assert_close(
        [p.grad for p in params], list(want["after"].values()), equal_nan=True
    )


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("expert", [True, False], ids=["expert", "dense"])
def test_norm_type_0_on_2_ranks_is_torchs(pool2, value, expert):
    """EP+FSDP on 2 ranks: the count of nonzero gradients, whatever rank holds which shard."""
    results = pool2.run(
        bodies.nonfinite_clip,
        SPEC,
        EP_FSDP,
        MeshDegrees(dp_shard=2, ep=2),
        expert=expert,
        index=2,
        element=7,
        on_rank=1,
        value=value,
        max_norm=0.5,
        norm_type=0.0,
        error_if_nonfinite=False,
        global_rows=ROWS,
    )
    assert_like_torch(results, 0.5, 0.0, False)
