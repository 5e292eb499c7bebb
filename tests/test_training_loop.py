"""A researcher's own training loop, built only from public calls, trains like one process.

Rows per data rank (`shard_batch`), sequence chunks under CP, the global token-mean loss with
ignored labels and fully ignored (empty) ranks (`count_tokens` + `token_mean_loss`), and the
gradient average for pipelines without FSDP (`sync_gradients`): every gradient at every step and
the final parameters equal single-process training on the global batch.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moetx
from moetx import (
    FSDP,
    ActivationCheckpoint,
    BatchError,
    ContextParallel,
    ExpertParallel,
    MeshDegrees,
    ParallelMesh,
    Pipeline,
    TensorParallel,
)
from moetx.models import MoEConfig
from moetx.testing import examples, fake_world
from moetx.testing.parity import compare
from moetx.testing.strategies import mesh_degrees
from moetx.testing.train import TrainSpec, assert_matches_reference, build_model, train
from tests.bodies import training_loop as bodies

CONFIG = MoEConfig(
    vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, num_experts=4,
    top_k=2, expert_hidden_size=8, num_shared_experts=1, aux_loss_coef=0.01,
)  # fmt: skip
# lr 1e-3: masks leave some weights with near-zero gradients, where AdamW's update (~lr whatever
# the gradient's size) turns fp32 summation-order noise into lr-sized parameter differences.
# Gradients are compared at every step at fp32 tolerance, so no scale error can hide.
SPEC = TrainSpec(config=CONFIG, steps=2, seq_len=8, rows_per_rank=2, lr=1e-3)


# Aux-loss-free balancing: a bias step (0.05) larger than the spread of the router's scores, so
# a bias that moved by one rank's load instead of the global load routes differently.
BIAS = attrs.evolve(SPEC, config=attrs.evolve(CONFIG, routing_bias=True), bias_rate=0.05)


def _mask(data_ranks: int, mode: str, *, rank: int = 0, seed: int = 0) -> torch.Tensor:
    """`[steps, rows, seq]`, True where a label is ignored; `empty-rank`: all of `rank`'s rows."""
    shape = (SPEC.steps, data_ranks * SPEC.rows_per_rank, SPEC.seq_len)
    ignore = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.3
    if mode == "none":
        ignore[:] = False
    if mode == "empty-rank":
        rows = SPEC.rows_per_rank
        ignore[:, rank * rows : (rank + 1) * rows] = True
    ignore[:, -1, 0] = False  # the global batch scores at least one token
    return ignore


def _check_parity(
    pool, pipeline: Pipeline, degrees: MeshDegrees, ignore: torch.Tensor, spec: TrainSpec = SPEC
) -> None:
    results = pool.run(bodies.public_loop, spec, pipeline, degrees, ignore)
    data_ranks = degrees.dp_replicate * degrees.dp_shard
    model = build_model(spec)
    batches = bodies.masked_batches(spec, data_ranks, ignore)
    ref = train(model, batches, spec.lr, bias_rate=spec.bias_rate)
    for r, got in enumerate(results):  # every rank moved its biases as one process does
        compare(bodies.routing_biases(model), got["biases"], atol=0, rtol=0, what=f"rank {r} bias")
    assert_matches_reference(results, ref)


@st.composite
def loops(draw):
    degrees = draw(mesh_degrees(world_size=4))
    passes = [ContextParallel(comm=draw(st.sampled_from(["allgather", "p2p"])))] * (degrees.cp > 1)
    if degrees.ep > 1 or draw(st.booleans()):
        passes.append(ExpertParallel())
    if draw(st.booleans()):
        passes.append(ActivationCheckpoint())
    if draw(st.booleans()):
        passes.append(FSDP())
    data_ranks = degrees.dp_replicate * degrees.dp_shard
    mode = draw(st.sampled_from(["none", "random", "empty-rank"]))
    rank = draw(st.integers(0, data_ranks - 1))
    return (
        degrees,
        Pipeline(tuple(passes)),
        _mask(data_ranks, mode, rank=rank, seed=draw(st.integers(0, 9))),
    )


@settings(max_examples=examples(6), deadline=None)
@given(loops())
def test_any_mesh_and_label_mask_trains_like_one_process(pool4, loop):
    """Drawn meshes (dp_replicate, dp_shard, cp, ep), pipelines with and without FSDP, label
    masks (none, random, one data rank entirely ignored), with aux-loss-free balancing (the
    routing bias updated after each step): parity with one process, biases included."""
    degrees, pipeline, ignore = loop
    _check_parity(pool4, pipeline, degrees, ignore, BIAS)


@pytest.mark.parametrize(
    ("pipeline", "degrees"),
    [
        (Pipeline((ExpertParallel(),)), MeshDegrees(dp_replicate=2, dp_shard=2, ep=2)),
        (
            ContextParallel() | ExpertParallel(),
            MeshDegrees(dp_replicate=2, dp_shard=1, cp=2, ep=2),
        ),
        (
            ContextParallel() | ExpertParallel() | ActivationCheckpoint(),
            MeshDegrees(cp=2, dp_shard=2, ep=4),
        ),
    ],
    ids=["ep-hsdp-replicas", "cp-ep-replicas", "cp-ep-ac"],
)
def test_pipelines_without_fsdp_sync_experts_over_every_replica(pool4, pipeline, degrees):
    """Without FSDP, `sync_gradients` sums expert gradients over dp_replicate x ep_shard (the
    rank-local test helper it replaces summed over ep_shard only: wrong when dp_replicate > 1)."""
    _check_parity(
        pool4, pipeline, degrees, _mask(degrees.dp_replicate * degrees.dp_shard, "random")
    )


@pytest.mark.parametrize(
    ("pipeline", "degrees"),
    [
        (Pipeline((ExpertParallel(),)), MeshDegrees(dp_shard=2, ep=2)),
        (Pipeline((ActivationCheckpoint(),)), MeshDegrees(dp_shard=2)),
        (Pipeline((FSDP(),)), MeshDegrees(dp_shard=2)),
        (Pipeline(()), MeshDegrees(dp_shard=2)),
    ],
    ids=["ep", "ac", "fsdp", "no-pass"],
)
def test_routing_bias_updates_train_like_one_process(pool2, pipeline, degrees):
    """`update_routing_bias_` after every step moves every rank's bias by the global load: the
    biases, losses and every gradient equal one process's at both steps, with or without FSDP,
    and on a model no pass touched (the loop calls `sync_routing_load`)."""
    _check_parity(pool2, pipeline, degrees, _mask(2, "none"), BIAS)


def test_sync_gradients_refuses_counters_that_count_one_ranks_tokens(pool2):
    """No pass and no `sync_routing_load` on 2 token ranks: `sync_gradients` raises
    `LoadSyncError` naming the layers and the fix, before touching gradients or counters."""
    for r in pool2.run(bodies.sync_with_local_load, BIAS, MeshDegrees(dp_shard=2)):
        assert r["untouched"]
        assert r["msg"] == (
            "`sync_gradients` on 2 token ranks, but the routing-load counters of 2 MoE layer(s) "
            "(`model.layers.0.mlp`, `model.layers.1.mlp`) count only this rank's tokens: "
            "`update_routing_bias_` would move each rank's routing bias its own way.\n"
            "  fix: call `moetx.sync_routing_load(model, mesh)` once before the first forward "
            "(every moetx pass applied on this mesh does it for you)."
        )
    with fake_world(2):  # more than three layers are elided; one token rank needs no sum
        model = build_model(attrs.evolve(BIAS, config=attrs.evolve(BIAS.config, num_layers=4)))
        with pytest.raises(
            moetx.LoadSyncError,
            match=r"\(`model.layers.0.mlp`, `model.layers.1.mlp`, `model.layers.2.mlp`, \.\.\.\) count only",
        ):
            moetx.sync_gradients(model, ParallelMesh.build())
        assert moetx.sync_routing_load(model, ParallelMesh.build(tp=2)) == 0
        assert moetx.sync_routing_load(model, ParallelMesh.build()) == 4
        assert moetx.sync_routing_load(model, ParallelMesh.build()) == 0  # idempotent


@pytest.mark.parametrize(
    ("pipeline", "degrees"),
    [
        (TensorParallel() | ExpertParallel(), MeshDegrees(dp_shard=2, ep=2, tp=2)),
        (
            TensorParallel(sequence_parallel=True) | ContextParallel() | ExpertParallel(),
            MeshDegrees(dp_shard=1, cp=2, ep=2, tp=2),
        ),
        (TensorParallel() | FSDP(), MeshDegrees(dp_shard=2, tp=2)),
    ],
    ids=["tp-ep", "sp-cp-ep", "tp-fsdp"],
)
def test_tensor_parallel_loops_count_tokens_once_per_tp_group(pool4, pipeline, degrees):
    """tp ranks share their tokens: the token count, the loss scale and `sync_gradients` span
    the token ranks only (counting tp ranks too would scale every gradient by 1/tp)."""
    spec = attrs.evolve(SPEC, config=attrs.evolve(CONFIG, num_kv_heads=2))
    ignore = _mask(degrees.dp_replicate * degrees.dp_shard, "random", seed=3)
    results = pool4.run(bodies.public_loop, spec, pipeline, degrees, ignore)
    data_ranks = degrees.dp_replicate * degrees.dp_shard
    ref = train(build_model(spec), bodies.masked_batches(spec, data_ranks, ignore), spec.lr)
    assert_matches_reference(results, ref)


def test_an_empty_rank_contributes_nothing_and_never_nan(pool2):
    """A data rank whose labels are all ignored: finite losses, parity (2 ranks, FSDP)."""
    degrees = MeshDegrees(dp_shard=2)
    ignore = _mask(2, "empty-rank", rank=1)
    results = pool2.run(bodies.public_loop, SPEC, Pipeline((FSDP(),)), degrees, ignore)
    assert all(torch.isfinite(loss) for r in results for loss in r["losses"])
    ref = train(build_model(SPEC), bodies.masked_batches(SPEC, 2, ignore), SPEC.lr)
    assert_matches_reference(results, ref)


def test_data_rank_counts_dp_positions_and_skips_cp(pool4):
    """`data_rank` is the position over dp_replicate x dp_shard; the ranks of a cp group share it."""
    degrees = MeshDegrees(dp_replicate=2, dp_shard=1, cp=2)
    got = pool4.run(bodies.data_coordinates, degrees)
    assert got == [(0, 0, 2), (1, 0, 2), (2, 1, 2), (3, 1, 2)]


@pytest.mark.parametrize("world", [4, 16])
def test_data_rank_on_virtual_meshes(world):
    """Every data position appears cp times, at the ranks the dense mesh puts them."""
    for cp in (1, 2):
        for dp_replicate in (1, 2):
            seen = []
            for rank in range(world):
                with fake_world(world, rank=rank):
                    mesh = ParallelMesh.build(dp_replicate=dp_replicate, cp=cp)
                    seen.append((mesh.data_rank, mesh.data_size))
            assert seen == [(r // cp, world // cp) for r in range(world)]


def test_shard_batch_takes_this_ranks_rows_and_teaches_on_bad_batches():
    """Rows split evenly; uneven rows and a cp mesh without `ContextParallel` are `BatchError`s."""
    ids = torch.arange(6 * 4).reshape(6, 4)
    with fake_world(2, rank=1):
        mesh = ParallelMesh.build()
        model = build_model(SPEC)
        batch = moetx.shard_batch(model, mesh, ids, ids + 1)
        assert torch.equal(batch.input_ids, ids[3:]) and torch.equal(batch.labels, ids[3:] + 1)
        assert moetx.shard_batch(model, mesh, ids, rows="local").input_ids is ids
        with pytest.raises(
            BatchError,
            match=r"^The global batch has 5 rows, which do not split evenly over the mesh's 2 "
            r"data ranks \(dp_replicate × dp_shard\)\.\n  fix: use a multiple of 2 rows",
        ):
            moetx.shard_batch(model, mesh, ids[:5])
    with fake_world(2, rank=0):
        mesh = ParallelMesh.build(cp=2)
        with pytest.raises(
            BatchError,
            match=r"^The mesh has cp=2 but the model has no `ContextParallel`: the ranks of a cp "
            r"group would read the same tokens",
        ):
            moetx.shard_batch(build_model(SPEC), mesh, ids[:2])


def test_shard_batch_cuts_sequences_as_the_applied_context_parallel_does():
    """Under CP the rows are cut into this rank's load-balanced chunks with global positions."""
    ids = torch.arange(2 * 8).reshape(2, 8)
    with fake_world(2, rank=1):
        mesh = ParallelMesh.build(cp=2)
        model = ContextParallel().apply(build_model(SPEC), mesh)
        batch = moetx.shard_batch(model, mesh, ids, ids)
    assert batch.position_ids.tolist() == [[2, 3, 4, 5]] * 2
    assert torch.equal(batch.input_ids, ids[:, 2:6]) and torch.equal(batch.labels, ids[:, 2:6])


def test_shift_labels_aligns_next_token_targets():
    """`shift_labels` moves targets one left and ignores the last position."""
    assert moetx.shift_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, -100]]


def test_token_mean_loss_is_the_mean_over_scored_tokens_and_zero_when_none():
    """On one rank it is `cross_entropy(..., ignore_index=-100)`; all ignored gives 0, not NaN."""
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.tensor([[1, -100, 2], [-100, 4, 0]])
    with fake_world(1):
        mesh = ParallelMesh.build()
        got = moetx.token_mean_loss(logits, labels, mesh)
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1))
        torch.testing.assert_close(got, want)
        empty = moetx.token_mean_loss(logits, torch.full_like(labels, -100), mesh)
    assert empty.item() == 0.0
    empty.backward()
    assert logits.grad is not None and not logits.grad.any()


def test_sync_gradients_refuses_an_fsdp_model(pool2):
    """FSDP already averages gradients: a second average is refused with the fix."""
    (msg, _) = pool2.run(bodies.sync_on_fsdp_model, SPEC, MeshDegrees(dp_shard=2))
    assert msg.startswith(
        "`sync_gradients` on a model with `FSDP`: FSDP already averages gradients in backward"
    )
