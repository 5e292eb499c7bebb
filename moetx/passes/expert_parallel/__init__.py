"""`ExpertParallel`: the pass (`api`) and its token dispatchers (`dispatch`: all-to-all, all-gather)."""

from moetx.passes.expert_parallel.api import ExpertParallel
from moetx.passes.expert_parallel.dispatch import DISPATCHERS, make_dispatcher

__all__ = ["DISPATCHERS", "ExpertParallel", "make_dispatcher"]
