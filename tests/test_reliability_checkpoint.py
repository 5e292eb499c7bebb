"""Checkpoints: the optimizer's param-group hyperparameters come back after a load.

Before, nothing tested it: dropping `set_state_dict` from `load_checkpoint` passed the suite
(parameters and AdamW moments are loaded in place, the hyperparameters only by that call).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch

from moetx._checkpoint import load_checkpoint, save_checkpoint
from moetx._mesh import MeshDegrees
from moetx._pipeline import Pipeline
from moetx.models import MoEConfig
from moetx.passes import FSDP, ExpertParallel
from moetx.testing.bodies import reliability as bodies
from moetx.testing.bodies.end_to_end import make_optimizer
from moetx.testing.train import TrainSpec, build_model

SPEC = TrainSpec(config=MoEConfig(num_experts=4, num_layers=2, num_dense_layers=1), steps=2)
EP_FSDP = ExpertParallel() | FSDP()
SHARD = "__0_0.distcp"


def _saved(path: Path, spec: TrainSpec = SPEC) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and AdamW after one step, saved to `path` (one process, no process group)."""
    model = build_model(spec)
    opt = make_optimizer(model, spec.lr)
    model(torch.randint(0, 32, (2, 8)), labels=torch.randint(0, 32, (2, 8))).loss.backward()
    opt.step()
    save_checkpoint(path, model, opt)
    return model, opt


def _fresh(spec: TrainSpec = SPEC) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(attrs.evolve(spec, seed=spec.seed + 1))
    return model, make_optimizer(model, spec.lr)


# ------------------------------------------------------------- optimizer hyperparameters (12)


def test_param_group_hyperparameters_come_back_in_one_process(tmp_path):
    """A scheduler-decayed lr and a changed weight decay are restored into a fresh AdamW."""
    model, opt = _saved(tmp_path / "first")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    opt.step()
    scheduler.step()
    for group in opt.param_groups:
        group["weight_decay"] = 0.125
    save_checkpoint(tmp_path / "second", model, opt)
    fresh, fresh_opt = _fresh()
    load_checkpoint(tmp_path / "second", fresh, fresh_opt)
    assert [(g["lr"], g["weight_decay"]) for g in fresh_opt.param_groups] == [
        (SPEC.lr * 0.25, 0.125)
    ]


@pytest.mark.parametrize(
    ("pipeline", "degrees"),
    [(EP_FSDP, MeshDegrees(dp_shard=2, ep=2)), (Pipeline() | FSDP(), MeshDegrees(dp_shard=2))],
    ids=["ep-fsdp", "fsdp"],
)
def test_param_group_hyperparameters_come_back_on_2_ranks(pool2, tmp_path, pipeline, degrees):
    """Two scheduler steps (lr x 1/16) and weight decay 0.125 survive save and load."""
    for rank, res in enumerate(
        pool2.run(bodies.hyperparameters_round_trip, SPEC, pipeline, degrees, str(tmp_path))
    ):
        assert res["saved"] == [(SPEC.lr / 16, 0.125)] * len(res["saved"]), (rank, res)
        assert res["loaded"] == res["saved"], (rank, res)
