"""`ContextParallel`: the pass (`api`) and its ring/all-gather attention kernels (`attention`)."""

from moetx.passes.context_parallel.api import ContextParallel
from moetx.passes.context_parallel.attention import COMMS, ContextParallelAttentionCore

__all__ = ["COMMS", "ContextParallel", "ContextParallelAttentionCore"]
