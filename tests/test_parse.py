"""`Pipeline.parse`: text to pipeline for command lines and configs, with teaching errors."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given

from moetx import (
    FSDP,
    ActivationCheckpoint,
    ContextParallel,
    ExpertParallel,
    Pass,
    Pipeline,
    PipelineError,
    PipelineOrderError,
    Placement,
)
from moetx.core import register_pass, registered_passes
from moetx.testing.strategies import pipelines


def test_builtin_names_parse_to_default_passes() -> None:
    """`cp|ep|ac|fsdp` is the four built-ins with their defaults, spaces ignored."""
    assert Pipeline.parse(" cp | ep|ac |fsdp ") == (
        ContextParallel() | ExpertParallel() | ActivationCheckpoint() | FSDP()
    )
    assert set(registered_passes()) >= {"cp", "ep", "ac", "fsdp"}


def test_options_are_keyword_literals() -> None:
    """`name(option=literal)` sets the pass's fields, tuples and None included."""
    got = Pipeline.parse(
        "ep(dispatcher='all_gather') | ac(mode='full', every=2) | "
        "fsdp(reshard_after_forward=False, fp32_modules=('router',), param_dtype=None)"
    )
    assert got == Pipeline(
        (
            ExpertParallel(dispatcher="all_gather"),
            ActivationCheckpoint(mode="full", every=2),
            FSDP(reshard_after_forward=False),
        )
    )


def test_empty_text_is_the_empty_pipeline() -> None:
    """An empty string parses to `Pipeline()` (apply is then the identity)."""
    assert Pipeline.parse("") == Pipeline()


@given(pipelines())
def test_parse_inverts_repr_over_stage_names(pipeline: Pipeline) -> None:
    """Writing each pass as `stage(field=value, ...)` parses back to an equal pipeline."""
    names = {cls: name for name, cls in registered_passes().items()}
    text = " | ".join(
        f"{names[type(p)]}("
        + ", ".join(f"{f.name}={getattr(p, f.name)!r}" for f in attrs.fields(type(p)))
        + ")"
        for p in pipeline
    )
    assert Pipeline.parse(text) == pipeline


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("ep|sp", r"'sp' is not a registered pass"),
        ("ep||fsdp", r"it is not `name\|name\(option=value\)\|\.\.\.`"),
        ("ep(all_gather)", r"options of 'ep' must be keywords"),
        ("ep(dispatcher=make())", r"options of 'ep' must be Python literals"),
        ("ep.x", r"'ep\.x' is not a pass name"),
    ],
)
def test_bad_text_is_a_pipeline_error_with_the_fix(text: str, why: str) -> None:
    """Unknown names, positional or non-literal options and bad syntax are refused, naming the fix."""
    with pytest.raises(
        PipelineError, match=rf"^cannot parse the pipeline .*: {why}\.\n  fix: join"
    ):
        Pipeline.parse(text)


def test_parsed_pipelines_are_checked_like_any_other() -> None:
    """A wrong order in text is the usual `PipelineOrderError`; a bad option the pass's own error."""
    with pytest.raises(PipelineOrderError, match=r"^`FSDP` must come after `ExpertParallel`\."):
        Pipeline.parse("fsdp|ep")
    with pytest.raises(ValueError, match=r"dispatcher"):
        Pipeline.parse("ep(dispatcher='bogus')")


def test_a_name_belongs_to_one_class() -> None:
    """Registering another class under a taken name fails; redefining the same class replaces it."""

    def make() -> type[Pass]:
        @attrs.frozen
        class Probe(Pass):
            placement = Placement("probe")

            def _apply(self, model, mesh, record):  # type: ignore[no-untyped-def]
                return model

        return Probe

    first, again = make(), make()  # same module and qualname: a re-run notebook cell
    register_pass("probe")(first)
    register_pass("probe")(again)
    assert registered_passes()["probe"] is again
    with pytest.raises(PipelineError, match=r"^the pass name 'ep' is taken by `ExpertParallel`"):
        register_pass("ep")(again)
