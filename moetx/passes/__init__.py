"""The built-in passes, one module each: context parallel, expert parallel, AC, FSDP."""

from moetx.passes._activation_checkpoint import ActivationCheckpoint
from moetx.passes._context_parallel import ContextParallel
from moetx.passes._expert_parallel import ExpertParallel
from moetx.passes._fsdp import FSDP

__all__ = ["FSDP", "ActivationCheckpoint", "ContextParallel", "ExpertParallel"]
