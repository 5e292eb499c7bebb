"""moetx: parallelism for Mixture-of-Experts transformers as composable, checked transforms.

pipeline = ExpertParallel() | ActivationCheckpoint() | FSDP()   # `|` sequences passes
model = pipeline.apply(model, ParallelMesh.build(ep=2))

The package is layered; each layer imports only from those before it: `core` (passes,
pipelines, order rules, record, errors) -> `mesh` -> `structure` (and `models`) -> `passes` ->
`training` -> `planning` -> `cli`. `testing` builds on the public API. Importing `moetx`
imports every layer below `cli`, which fills the core's two seams (`moetx.core.seams`).
"""

from moetx.core import BUILTIN_ORDER, Applied, Pass, Pipeline, Placement, applied_passes
from moetx.core.errors import (
    ActivationCheckpointError,
    BatchError,
    CheckpointError,
    CommandLineError,
    ContextParallelInputError,
    DuplicatePassError,
    ExpertDivisibilityError,
    GradientSyncError,
    MeshAxisError,
    MeshError,
    ModelConfigError,
    MoetxError,
    NoMoELayersError,
    PartiallyAppliedModelError,
    PassAlreadyAppliedError,
    PassOptionError,
    PassPreconditionError,
    PipelineError,
    PipelineOrderError,
    SequenceDivisibilityError,
    UnknownModelStructureError,
    UnsupportedAttentionError,
)
from moetx.mesh import MeshDegrees, ParallelMesh
from moetx.passes import (
    FSDP,
    ActivationCheckpoint,
    ContextParallel,
    ExpertParallel,
    TensorParallel,
)
from moetx.planning import ParamGroup, Plan, RankBytes
from moetx.training import (
    RankBatch,
    TokenCount,
    clip_grad_norm_,
    count_tokens,
    data_sampler,
    full_state_dict,
    grad_norm,
    load_checkpoint,
    no_sync,
    save_checkpoint,
    shard_batch,
    shift_labels,
    sync_gradients,
    token_mean_loss,
)

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_ORDER",
    "FSDP",
    "ActivationCheckpoint",
    "ActivationCheckpointError",
    "Applied",
    "BatchError",
    "CheckpointError",
    "CommandLineError",
    "ContextParallel",
    "ContextParallelInputError",
    "DuplicatePassError",
    "ExpertDivisibilityError",
    "ExpertParallel",
    "GradientSyncError",
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
    "PassOptionError",
    "PassPreconditionError",
    "Pipeline",
    "PipelineError",
    "PipelineOrderError",
    "Placement",
    "Plan",
    "RankBatch",
    "RankBytes",
    "SequenceDivisibilityError",
    "TensorParallel",
    "TokenCount",
    "UnknownModelStructureError",
    "UnsupportedAttentionError",
    "__version__",
    "applied_passes",
    "clip_grad_norm_",
    "count_tokens",
    "data_sampler",
    "full_state_dict",
    "grad_norm",
    "load_checkpoint",
    "no_sync",
    "save_checkpoint",
    "shard_batch",
    "shift_labels",
    "sync_gradients",
    "token_mean_loss",
]
