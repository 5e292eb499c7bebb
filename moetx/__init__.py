"""moetx: parallelism for Mixture-of-Experts transformers as composable, checked transforms.

pipeline = ExpertParallel() | ActivationCheckpoint() | FSDP()   # `|` sequences passes
model = pipeline.apply(model, ParallelMesh.build(ep=2))
"""

from moetx._accumulate import no_sync
from moetx._checkpoint import full_state_dict, load_checkpoint, save_checkpoint
from moetx._clip import clip_grad_norm_, grad_norm
from moetx._errors import (
    ActivationCheckpointError,
    CheckpointError,
    ContextParallelInputError,
    DuplicatePassError,
    ExpertDivisibilityError,
    MeshAxisError,
    MeshError,
    ModelConfigError,
    MoetxError,
    NoMoELayersError,
    PartiallyAppliedModelError,
    PassAlreadyAppliedError,
    PassPreconditionError,
    PipelineError,
    PipelineOrderError,
    SequenceDivisibilityError,
    UnknownModelStructureError,
    UnsupportedAttentionError,
)
from moetx._mesh import MeshDegrees, ParallelMesh
from moetx._order import BUILTIN_ORDER, Placement
from moetx._pass import Applied, Pass, applied_passes
from moetx._pipeline import Pipeline
from moetx._plan import ParamGroup, Plan, RankBytes
from moetx.passes import FSDP, ActivationCheckpoint, ContextParallel, ExpertParallel

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_ORDER",
    "FSDP",
    "ActivationCheckpoint",
    "ActivationCheckpointError",
    "Applied",
    "CheckpointError",
    "ContextParallel",
    "ContextParallelInputError",
    "DuplicatePassError",
    "ExpertDivisibilityError",
    "ExpertParallel",
    "MeshAxisError",
    "MeshDegrees",
    "MeshError",
    "ModelConfigError",
    "MoetxError",
    "NoMoELayersError",
    "ParallelMesh",
    "ParamGroup",
    "PartiallyAppliedModelError",
    "Pass",
    "PassAlreadyAppliedError",
    "PassPreconditionError",
    "Pipeline",
    "PipelineError",
    "PipelineOrderError",
    "Placement",
    "Plan",
    "RankBytes",
    "SequenceDivisibilityError",
    "UnknownModelStructureError",
    "UnsupportedAttentionError",
    "__version__",
    "applied_passes",
    "clip_grad_norm_",
    "full_state_dict",
    "grad_norm",
    "load_checkpoint",
    "no_sync",
    "save_checkpoint",
]
