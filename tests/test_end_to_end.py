"""The passes proven together: any legal pipeline on any legal 4-rank mesh trains like one process."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from moetx.testing import examples
from moetx.testing.strategies import mesh_degrees, moe_configs, pipelines
from moetx.testing.train import TrainSpec, assert_training_parity, rank_train


@st.composite
def scenarios(draw):
    degrees = draw(mesh_degrees(world_size=4))
    stages = ("cp", "ep", "ac", "fsdp") if degrees.cp > 1 else ("ep", "ac", "fsdp")
    pipe = draw(
        pipelines(
            stages=stages,
            required=("fsdp",) + (("cp",) if degrees.cp > 1 else ()),
            mixed_precision=False,
        )
    )
    has_ep = any(p.placement.stage == "ep" for p in pipe)
    # two layers: `ActivationCheckpoint(every=2)` needs at least two blocks (its precondition)
    config = draw(moe_configs(ep_degree=degrees.ep if has_ep else 1, num_layers=2))
    return degrees, pipe, config


@settings(max_examples=examples(8), deadline=None)
@given(scenarios())
def test_any_legal_pipeline_on_any_legal_mesh_trains_like_one_process(pool4, scenario):
    """3 AdamW steps on per-rank data: losses and every gathered gradient at each step, and the
    final parameters, equal the single-process model trained on the global batch.

    FSDP is always present: it is what averages gradients over data-parallel ranks (without it,
    averaging is the training loop's job, covered by the expert-parallel tests).
    """
    degrees, pipe, config = scenario
    # lr 1e-3: AdamW divides each gradient by its own size, so an element whose gradient is tiny
    # (fp32 rounding a sizeable share of it) moves by a rounding-dependent part of lr; at 1e-2
    # that reached 2.6e-05 on a correct pipeline. An optimizer-state bug still moves a parameter
    # by ~lr = 1e-3, far outside the tolerance.
    # with aux-loss-free balancing the bias moves after every step (by the global load)
    spec = TrainSpec(config=config, steps=3, seq_len=8, lr=1e-3, bias_rate=0.05)
    assert_training_parity(pool4.run(rank_train, spec, pipe, degrees), spec, degrees)
