"""Layer 6, planning: what a pipeline will do before it runs (bytes per rank, placements).

`plan` applies the pipeline for real on `meta` under a fake world (`fake_world`), `report` holds
what it returns and how it reads, `meter` measures activation bytes of a forward.
"""

from moetx.planning.fake_world import fake_world
from moetx.planning.meter import LiveActivationMeter
from moetx.planning.plan import plan
from moetx.planning.report import ParamGroup, Plan, RankBytes, human_bytes, render

__all__ = [
    "LiveActivationMeter",
    "ParamGroup",
    "Plan",
    "RankBytes",
    "fake_world",
    "human_bytes",
    "plan",
    "render",
]
