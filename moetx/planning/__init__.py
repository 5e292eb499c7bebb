"""Layer 6, planning: what a pipeline will do before it runs (bytes per rank, placements).

`plan` applies the pipeline for real on `meta` under a fake world (`fake_world`), `report` holds
what it returns and how it reads, `meter` measures activation bytes of a forward. `autoplan`
chooses degrees and a pipeline for a memory budget from `predict` (state bytes from shapes,
activations from meta traces, collectives and FLOPs per rank).
"""

from moetx.planning.autoplan import AutoPlan, Candidate, CostModel, NoFittingPlanError, autoplan
from moetx.planning.fake_world import fake_world
from moetx.planning.meter import LiveActivationMeter
from moetx.planning.plan import plan
from moetx.planning.predict import Prediction, predict
from moetx.planning.predict_comm import Traffic
from moetx.planning.report import ParamGroup, Plan, RankBytes, human_bytes, render

__all__ = [
    "AutoPlan",
    "Candidate",
    "CostModel",
    "LiveActivationMeter",
    "NoFittingPlanError",
    "ParamGroup",
    "Plan",
    "Prediction",
    "RankBytes",
    "Traffic",
    "autoplan",
    "fake_world",
    "human_bytes",
    "plan",
    "predict",
    "render",
]
