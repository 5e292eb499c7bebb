"""The MoE hot path under `torch.compile`: one graph per block, no graph breaks, eager numerics."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moetx.passes.expert_parallel.dispatch import DISPATCHERS
from moetx.testing import compare
from tests.bodies import compile_ops as bodies
from tests.bodies.compile_ops import BlockCase

TOL = {"atol": 1e-5, "rtol": 1e-4}


def _check(case: BlockCase, results: list[dict[str, Any]], *, graphs: int = 1) -> None:
    for rank, res in enumerate(results):
        assert res["breaks"] == 0, f"rank {rank}: {res['breaks']} graph breaks"
        assert res["graphs"] == graphs, f"rank {rank}: {res['graphs']} graphs"
        eager = res["eager"]
        for key in ("compiled", "again"):
            got = res[key]
            assert got["missing"] == eager["missing"] == [], f"rank {rank}: {got['missing']}"
            compare(
                {k: eager[k] for k in ("out", "aux", "hidden_grad", "grads")},
                {k: got[k] for k in ("out", "aux", "hidden_grad", "grads")},
                what=f"rank {rank} {key} vs eager ({case})",
                **TOL,
            )
        # The load counter counts each forward once, compiled or not.
        for name, load in eager["buffers"].items():
            assert torch.equal(res["compiled"]["buffers"][name], 2 * load), name
            assert torch.equal(res["again"]["buffers"][name], 3 * load), name


@pytest.mark.parametrize("routing_bias", [False, True])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_ep_block_compiles_whole_2_ranks(pool2, dispatcher: str, shared: bool, routing_bias: bool):
    """EP (both dispatchers) block, aot_eager, fullgraph: one graph, no break, eager numerics."""
    case = BlockCase(dispatcher=dispatcher, shared=shared, routing_bias=routing_bias, tokens=(6, 4))
    _check(case, pool2.run(bodies.eager_then_compiled, case))
