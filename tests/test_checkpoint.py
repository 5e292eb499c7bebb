"""DCP checkpoints: save on one mesh, load on another, bit-exact; resume training; full export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import MoEConfig
from moetx.passes import FSDP, ActivationCheckpoint, ExpertParallel
from moetx.testing import compare
from moetx.testing.train import TrainSpec, build_model, mean_losses
from moetx.training.checkpoint import (
    CheckpointError,
    full_state_dict,
    load_checkpoint,
    save_checkpoint,
)
from tests.bodies import end_to_end as bodies

SPEC = TrainSpec(
    config=MoEConfig(
        num_experts=4, num_shared_experts=1, num_layers=2, num_dense_layers=1, num_mtp_layers=1
    ),
    steps=3,
)
ROWS = 8  # global rows per step, whatever the world size
SAVE_AFTER = 2
EXACT: dict[str, Any] = {"atol": 0.0, "rtol": 0.0}
ATOL, RTOL = 2e-5, 1e-4

EP_FSDP = ExpertParallel() | FSDP()
SAVED_ON = {
    "ep_fsdp_ep2": (EP_FSDP, MeshDegrees(dp_shard=4, ep=2)),
    "fsdp": (Pipeline() | FSDP(), MeshDegrees(dp_shard=4)),
}


@pytest.fixture(scope="module")
def saved(pool4, tmp_path_factory) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Checkpoints written on 4 ranks after 2 of 3 AdamW steps, with the uninterrupted runs."""
    out = {}
    for name, (pipeline, degrees) in SAVED_ON.items():
        path = str(tmp_path_factory.mktemp(name))
        results = pool4.run(
            bodies.train_save_continue,
            SPEC,
            pipeline,
            degrees,
            path,
            save_after=SAVE_AFTER,
            global_rows=ROWS,
        )
        out[name] = (path, results)
    return out


def _assert_restored(saved_run: list[dict[str, Any]], loaded: list[dict[str, Any]]) -> None:
    """Every rank's gathered parameters and rank 0's full AdamW state are bit-exact."""
    for rank, res in enumerate(loaded):
        compare(
            saved_run[0]["params"],
            res["params"],
            what=f"rank {rank} parameters after load",
            **EXACT,
        )
    optim = saved_run[0]["optim"]
    assert set(optim["state"]) == set(saved_run[0]["params"])  # every parameter has AdamW state
    compare(optim, loaded[0]["optim"], what="optimizer state after load", **EXACT)


CASES = [
    # (saved on, loaded with, world size or None for a plain module in this process)
    ("ep_fsdp_ep2", EP_FSDP, MeshDegrees(dp_shard=4, ep=4), 4),
    ("fsdp", EP_FSDP, MeshDegrees(dp_shard=4, ep=2), 4),
    ("ep_fsdp_ep2", EP_FSDP, MeshDegrees(dp_shard=2, ep=2), 2),
    ("ep_fsdp_ep2", Pipeline() | FSDP(), MeshDegrees(dp_shard=2), 2),
    ("ep_fsdp_ep2", None, None, None),
]


@pytest.mark.parametrize(
    ("saved_on", "pipeline", "degrees", "world"),
    CASES,
    ids=["ep2-to-ep4", "fsdp-to-ep2", "4-to-2-ranks", "ep-to-fsdp-2-ranks", "4-ranks-to-plain"],
)
def test_load_on_another_mesh_is_bit_exact_and_resumes(
    request, saved, saved_on, pipeline, degrees, world
):
    """Model and AdamW state come back bit-exact; step 3 matches the uninterrupted run."""
    path, saved_run = saved[saved_on]
    kwargs: dict[str, Any] = {"start": SAVE_AFTER, "global_rows": ROWS}
    if world is None:  # one process, no process group, an unparallelized module
        loaded = [bodies.load_and_continue(SPEC, Pipeline(), None, path, **kwargs)]
    else:
        pool = request.getfixturevalue(f"pool{world}")
        loaded = pool.run(bodies.load_and_continue, SPEC, pipeline, degrees, path, **kwargs)
    _assert_restored(saved_run, loaded)
    want = mean_losses(saved_run)[SAVE_AFTER]
    got = mean_losses(loaded)[0]
    compare({"loss": want}, {"loss": got}, atol=ATOL, rtol=RTOL, what="loss of the resumed step")


def test_same_mesh_resume_is_bit_exact(pool4, saved):
    """Saved and loaded on the same mesh, the resumed step's losses equal the uninterrupted ones."""
    path, saved_run = saved["ep_fsdp_ep2"]
    pipeline, degrees = SAVED_ON["ep_fsdp_ep2"]
    loaded = pool4.run(
        bodies.load_and_continue, SPEC, pipeline, degrees, path, start=SAVE_AFTER, global_rows=ROWS
    )
    _assert_restored(saved_run, loaded)
    for rank, (a, b) in enumerate(zip(saved_run, loaded, strict=True)):
        assert torch.equal(a["losses"][SAVE_AFTER], b["losses"][0]), rank


def test_full_state_dict_at_save_time_is_the_gathered_model(saved):
    """Rank 0's export holds exactly the gathered parameters, by original name; others get {}."""
    _, saved_run = saved["ep_fsdp_ep2"]
    compare(saved_run[0]["params"], saved_run[0]["full"], what="rank 0 export", **EXACT)
    assert [r["full"] for r in saved_run[1:]] == [{}, {}, {}]


def test_meta_built_model_loads_without_materialising_the_full_model(pool4, tmp_path):
    """Meta build, `ExpertParallel() | FSDP()`, `to_empty`, load: equals the eager model.

    What is checked about memory: after `apply` every parameter and buffer is still on meta
    (nothing was allocated while building and sharding), and after `to_empty` each rank holds
    at most 1.05x its 1/4 share of the parameter bytes. The checkpoint is written by this
    process from the eager, unparallelized model (1 process -> 4 ranks).
    """
    spec = TrainSpec(
        config=MoEConfig(hidden_size=32, num_layers=2, num_experts=8, expert_hidden_size=16)
    )
    eager = build_model(spec)
    save_checkpoint(tmp_path, eager)
    want = {n: p.detach() for n, p in eager.named_parameters()}
    results = pool4.run(
        bodies.meta_load, spec, EP_FSDP, MeshDegrees(dp_shard=4, ep=2), str(tmp_path)
    )
    total = sum(t.numel() * t.element_size() for t in want.values())
    for rank, res in enumerate(results):
        assert res["all_meta"], rank
        assert res["local_bytes"] <= 1.05 * total / 4, (rank, res["local_bytes"], total / 4)
        compare(want, res["params"], what=f"rank {rank} loaded parameters", **EXACT)


@pytest.mark.parametrize(
    "pipeline",
    [Pipeline() | ExpertParallel(), EP_FSDP, ExpertParallel() | ActivationCheckpoint() | FSDP()],
    ids=["ep", "ep-fsdp", "ep-ac-fsdp"],
)
def test_full_state_dict_has_original_names_global_shapes_and_copies(pool2, pipeline):
    """Keys are the plain model's, tensors are global, full and detached from the live model."""
    results = pool2.run(bodies.exported_state, SPEC, pipeline, MeshDegrees(dp_shard=2, ep=2))
    plain = build_model(SPEC)
    want = {k: v.detach() for k, v in plain.state_dict().items()}
    assert results[0]["keys"] == list(want)
    # The bodies add 1 to every parameter in place after exporting: copies do not see it.
    compare(want, results[0]["rank0"], what="rank 0 export", **EXACT)
    assert results[1]["rank0"] == {}
    for rank, res in enumerate(results):
        compare(want, res["everyone"], what=f"rank {rank} export (rank0_only=False)", **EXACT)


def test_full_state_dict_without_process_group():
    """A plain module in one process: its state dict, copied, under canonical names."""
    model = build_model(SPEC)
    state = full_state_dict(model)
    assert list(state) == list(model.state_dict())
    weight = model.get_parameter("lm_head.weight")
    with torch.no_grad():
        weight.add_(1.0)
    assert not torch.equal(state["lm_head.weight"], weight)


def test_load_errors_are_explained(tmp_path: Path):
    """A directory that is not a checkpoint, and asking for optimizer state that was not saved."""
    model = build_model(SPEC)
    with pytest.raises(
        CheckpointError,
        match=r"^`.*` is not a distributed checkpoint: it has no `\.metadata` file\.",
    ):
        load_checkpoint(tmp_path, model)
    save_checkpoint(tmp_path, model)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match=r"^The checkpoint `.*` has no optimizer state"):
        load_checkpoint(tmp_path, model, opt)
    load_checkpoint(tmp_path, model)  # the model alone loads
