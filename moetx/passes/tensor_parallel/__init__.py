"""`TensorParallel`: the pass (`api`) and what it shards in a model (`targets`)."""

from moetx.passes.tensor_parallel.api import TensorParallel
from moetx.passes.tensor_parallel.targets import TPTarget, tp_targets

__all__ = ["TPTarget", "TensorParallel", "tp_targets"]
