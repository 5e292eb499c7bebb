"""Layer 4, the passes: one subpackage per parallelism, each owning its helpers.

`tensor_parallel` (with what it shards), `context_parallel` (with its attention kernels), `expert_parallel` (with its token dispatchers),
`activation_checkpoint` (with its recompute contexts and caches), `compile` (per-block
`torch.compile` and its report), `fsdp`; `load_sync` is the
routing-load counter reduction every pass installs. Each pass registers its `Pipeline.parse` name.
"""

from moetx.passes.activation_checkpoint import ActivationCheckpoint
from moetx.passes.compile import Compile
from moetx.passes.context_parallel import ContextParallel
from moetx.passes.expert_parallel import ExpertParallel
from moetx.passes.fsdp import FSDP
from moetx.passes.tensor_parallel import TensorParallel

__all__ = [
    "FSDP",
    "ActivationCheckpoint",
    "Compile",
    "ContextParallel",
    "ExpertParallel",
    "TensorParallel",
]
