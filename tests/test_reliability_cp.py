"""Context-parallel inputs whose shards do not fit together fail with a typed error on every rank.

Local sequence lengths that differ across the cp ranks made gloo abort one rank (SIGABRT inside
the K/V all-gather) and an odd local length under the head-tail layout ran silently with a
wrong causal mask. The context-parallel model now all-gathers each rank's local input shape
once per forward (two integers) and every rank raises the same error.
"""

from __future__ import annotations

import re

import pytest

from tests.bodies import reliability as bodies


@pytest.mark.parametrize("comm", ["allgather", "p2p"])
@pytest.mark.parametrize(("lengths", "rows"), [([4, 2], 2), ([4, 4], 1)], ids=["len", "rows"])
def test_uneven_local_shapes_raise_on_every_rank(pool2, comm, lengths, rows):
    """Rank 0 holds 4 tokens per row and rank 1 2 (or rank 1 one row less): both raise."""
    results = pool2.run(bodies.cp_local_lengths_rows, comm, lengths, rows)
    want = {0: "[2, 4]", 1: f"[{rows}, {lengths[1]}]"}
    for rank, res in enumerate(results):
        kind, message = res["error"]
        assert kind == "ContextParallelInputError", (rank, res)
        first, fix = message.splitlines()
        assert re.match(
            rf"^The local input shapes of a context-parallel model differ across the cp ranks "
            rf"\(rank 0: {re.escape(want[0])}, rank 1: {re.escape(want[1])}\); every rank must "
            r"hold the same number of rows and tokens\.$",
            first,
        ), (rank, first)
        assert fix.startswith("  fix: cut the batch with `cp.shard_sequence(mesh, ids, labels)`")


@pytest.mark.parametrize("comm", ["allgather", "p2p"])
def test_odd_local_length_with_load_balance_raises_on_every_rank(pool2, comm):
    """3 tokens per rank cannot be two equal head-tail chunks: both ranks raise."""
    for rank, res in enumerate(pool2.run(bodies.cp_local_lengths_rows, comm, [3, 3], 2)):
        kind, message = res["error"]
        assert kind == "SequenceDivisibilityError", (rank, res)
        assert re.match(
            r"^The local sequence length \(3\) of a context-parallel model must be even: "
            r"`ContextParallel\(load_balance=True\)` holds two equal chunks per rank\.\n"
            r"  fix: cut the batch with `cp\.shard_sequence",
            message,
        ), (rank, message)


def test_even_shapes_still_run(pool2):
    """Equal, even local lengths pass the check and train."""
    for res in pool2.run(bodies.cp_local_lengths_rows, "allgather", [4, 4], 2):
        assert "ok" in res, res
