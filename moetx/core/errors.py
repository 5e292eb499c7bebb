"""The moetx error family: one module so users can catch any moetx failure by type.

Every error inherits from `MoetxError` and from the builtin that best describes it, so
`except ValueError` in user code keeps working. Messages follow the house style: the first
line is one sentence naming the subject (in backticks), the value (in parentheses) and the
constraint; indented context lines follow, and a `fix:` line where the fix is obvious.
"""

from __future__ import annotations


class MoetxError(Exception):
    """Base class of every moetx error."""


class PipelineError(MoetxError, ValueError):
    """A pipeline was composed wrongly; raised when it is built, before any model exists.

    Attributes:
        problems: Every independent problem found, one sentence each (all are reported at once).
    """

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (message.splitlines()[0],)


class PipelineOrderError(PipelineError):
    """Passes are out of order, or a pass is applied after one that must follow it."""


class DuplicatePassError(PipelineError):
    """The same kind of parallelism appears twice in one pipeline."""


class PassAlreadyAppliedError(MoetxError, ValueError):
    """A model already carries the effect of this kind of pass."""


class PartiallyAppliedModelError(MoetxError, RuntimeError):
    """A previous `apply` failed midway; the model is in an unknown state and must be rebuilt."""


class MeshError(MoetxError, ValueError):
    """Mesh degrees are inconsistent with each other or with the world size."""


class MeshAxisError(MeshError):
    """A pass needs a mesh axis the given mesh does not have."""


class PassPreconditionError(MoetxError, ValueError):
    """A model or mesh does not satisfy what a pass needs; raised before the model is touched."""


class NoMoELayersError(PassPreconditionError):
    """A pass that transforms MoE layers was given a model without any."""


class ExpertDivisibilityError(PassPreconditionError):
    """An MoE layer's expert count is not divisible by the expert-parallel degree."""


class SequenceDivisibilityError(PassPreconditionError):
    """A sequence length cannot be split evenly for context parallelism."""


class ActivationCheckpointError(MoetxError, RuntimeError):
    """A checkpointed block's recomputation cannot reproduce its forward (raised in backward)."""


class CheckpointError(MoetxError, ValueError):
    """A checkpoint directory is missing or lacks what the caller asked to load."""


class ContextParallelInputError(MoetxError, ValueError):
    """A context-parallel model or `shard_sequence` was called with inputs it cannot use."""


class ModelConfigError(MoetxError, ValueError):
    """A synthetic model config (`moetx.models.MoEConfig`) is inconsistent; lists every problem."""


class UnsupportedAttentionError(PassPreconditionError):
    """An attention module cannot be made context-parallel by moetx."""


class UnknownModelStructureError(MoetxError, TypeError):
    """moetx could not find the parts of a model (blocks, attention, MoE layers) it needs."""


class WorldSizeError(MoetxError, ValueError):
    """A world size or rank is out of range."""


class ProcessGroupExistsError(MoetxError, RuntimeError):
    """A default process group already exists in this process, so a fake one cannot be created."""


class BatchError(MoetxError, ValueError):
    """A batch does not fit the mesh (rows not divisible by the data ranks, mismatched labels)."""


class GradientSyncError(MoetxError, ValueError):
    """Gradients cannot be synchronised this way (e.g. `sync_gradients` on an FSDP model)."""


class FSDPRootError(MoetxError, RuntimeError):
    """A first forward through `FSDP(wrap_root=False)` units with no FSDP root above them."""


class LoadSyncError(GradientSyncError):
    """`sync_gradients` on token ranks whose routing-load counters count only their own tokens
    (no pass installed the sum; `moetx.sync_routing_load` does)."""


class CommandLineError(MoetxError, ValueError):
    """A `moetx demo` / `moetx plan` argument is out of range; lists every bad flag."""


class PassOptionError(MoetxError, ValueError, TypeError):
    """A pass was built with invalid options; names every bad field (a wrong type or value).

    Both a `ValueError` and a `TypeError`, so either `except` clause catches it.

    Attributes:
        problems: One sentence per bad field, in field order.
    """

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (message.splitlines()[0],)


class PlanningError(MoetxError, ValueError):
    """`predict` / `autoplan` got something they do not model (an unknown pass, mode or axis)."""
