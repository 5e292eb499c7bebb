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
    """`Compile` from the README sits after ac and before fsdp, and applies on a real mesh."""
    namespace: dict = {}
    exec(_block("class Compile(Pass)"), namespace)
    compile_pass = namespace["Compile"]
    pipeline = moetx.ExpertParallel() | moetx.ActivationCheckpoint() | compile_pass() | moetx.FSDP()
    assert repr(pipeline).endswith("| Compile() | FSDP()")
    with pytest.raises(moetx.PipelineOrderError, match=r"^`FSDP` must come after `Compile`\."):
        moetx.FSDP() | compile_pass()
    with pytest.raises(
        moetx.PipelineOrderError, match=r"^`Compile` must come after `ExpertParallel`\."
    ):
        compile_pass() | moetx.ExpertParallel()
    with fake_world(1):
        model = compile_pass().apply(MoETransformer(MoEConfig()), moetx.ParallelMesh.build())
    assert [type(a.pass_).__name__ for a in moetx.applied_passes(model)] == ["Compile"]
