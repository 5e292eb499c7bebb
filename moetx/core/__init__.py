"""Layer 1, the core algebra: passes, pipelines, ordering rules, the model record and the errors.

Imports nothing else from moetx; the layers above plug in through `moetx.core.seams`.
"""

from moetx.core.algebra import Pass, Pipeline, register_pass, registered_passes
from moetx.core.order import BUILTIN_ORDER, Placement
from moetx.core.record import Applied, applied_passes, find_applied

__all__ = [
    "BUILTIN_ORDER",
    "Applied",
    "Pass",
    "Pipeline",
    "Placement",
    "applied_passes",
    "find_applied",
    "register_pass",
    "registered_passes",
]
