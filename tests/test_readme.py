"""The README's examples are true: the custom-pass recipe works and the order error reads as shown."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import moetx
from moetx.models import MoEConfig, MoETransformer
from moetx.testing import fake_world

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(containing: str) -> str:
    blocks = re.findall(r"```(?:python|text)\n(.*?)```", README, re.S)
    return next(b for b in blocks if containing in b)


def test_the_order_error_is_exactly_as_shown():
    """The README's order-error transcript is what moetx prints."""
    shown = _block("moetx.PipelineOrderError").splitlines()
    with pytest.raises(moetx.PipelineOrderError) as err:
        moetx.ActivationCheckpoint() | moetx.ExpertParallel()
    assert shown[0] == ">>> ActivationCheckpoint() | ExpertParallel()"
    assert "\n".join(shown[1:]) == f"moetx.PipelineOrderError: {err.value}"


def test_the_custom_pass_recipe_declares_its_place_and_applies():
    """`FreezeRouters` from the README sits after ep and before fsdp, parses, and applies."""
    namespace: dict = {}
    exec(_block("class FreezeRouters(Pass)"), namespace)
    freeze = namespace["FreezeRouters"]
    pipeline = moetx.ExpertParallel() | freeze() | moetx.Compile() | moetx.FSDP()
    assert repr(pipeline).endswith("| FreezeRouters() | Compile() | FSDP()")
    assert moetx.Pipeline.parse("ep|freeze_routers|fsdp") == (
        moetx.ExpertParallel() | freeze() | moetx.FSDP()
    )
    with pytest.raises(moetx.PipelineOrderError, match=r"^`FSDP` must come after `FreezeRouters`"):
        moetx.FSDP() | freeze()
    with pytest.raises(
        moetx.PipelineOrderError, match=r"^`FreezeRouters` must come after `ExpertParallel`\."
    ):
        freeze() | moetx.ExpertParallel()
    dense = MoEConfig(num_layers=1, num_dense_layers=1, num_mtp_layers=0)
    with fake_world(1):
        mesh = moetx.ParallelMesh.build()
        with pytest.raises(moetx.NoMoELayersError, match="has no router to freeze"):
            freeze().apply(MoETransformer(dense), mesh)
        model = freeze().apply(MoETransformer(MoEConfig()), mesh)
    (applied,) = moetx.applied_passes(model)
    assert type(applied.pass_).__name__ == "FreezeRouters"
    routers = applied.facts["routers"]
    assert routers and all(
        not p.requires_grad for r in routers for p in model.get_submodule(r).parameters()
    )
