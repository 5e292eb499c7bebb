"""`refusal`: a pipeline's checks run on a mesh's degrees alone, so a refused trace needs no fake world.

A meta trace (`trace_blocks`) builds a fake world of cp x tp x ep ranks and its `ParallelMesh`,
then applies the passes, and their checks refuse before anything is traced (`ContextParallel`
refuses DeepSeek-V3's MTP head): at tp 8 and ep 16 that is a world of 1,024 ranks and ~3,900
process groups for an error. The checks of the passes a trace applies read the model, the
record, and the mesh's axes and degrees; none uses a device mesh. `refusal` runs
`Pipeline.validate` on a `ParallelMesh` with the same degrees, axes and device type whose device
meshes are stand-ins: a check that uses one (a size, a group, a coordinate, even its repr) is
stopped there and the answer is "undecided" (None), for the caller to build the mesh and check
on it. A check that finishes without one has read only what the stand-in answers as the real
mesh does, so it refuses (or passes) exactly as it would there: same error, same message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn, cast

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moetx.core.algebra import Pass, Pipeline
from moetx.core.errors import MoetxError
from moetx.mesh.parallel_mesh import AXES, MeshDegrees, ParallelMesh

__all__ = ["refusal"]


class _MeshUsed(BaseException):
    """A check used a device mesh, which only the built mesh can answer for.

    A `BaseException`, so no `except Exception` in a check takes it for a failure of its own.
    """


class _Unbuilt:
    """Stands in for every `DeviceMesh` of a degrees-only `ParallelMesh`: any use stops the check."""

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("__"):  # a protocol probe (`inspect.unwrap`, copy, pickle), not a use
            raise AttributeError(name)
        raise _MeshUsed(name)

    def _used(self, *args: object, **kwargs: object) -> NoReturn:
        raise _MeshUsed("operator")

    # Implicit special-method lookups skip `__getattr__`: each one a check could reach.
    __getitem__ = __len__ = __iter__ = __contains__ = __bool__ = _used
    __eq__ = __ne__ = __hash__ = __repr__ = __str__ = __format__ = _used  # type: ignore[assignment]


class _DegreesOnly(ParallelMesh):
    """A `ParallelMesh` that answers degrees, axes and the device type as a built one does, and
    hands out `_Unbuilt` device meshes."""

    def __getitem__(self, axis: str) -> DeviceMesh:
        if axis in AXES:
            return cast(DeviceMesh, _Unbuilt())
        return super().__getitem__(axis)  # the built mesh's error for an unknown axis


def refusal(
    model: nn.Module, passes: Sequence[Pass], degrees: MeshDegrees, *, device_type: str = "cpu"
) -> MoetxError | None:
    """The error `Pipeline(passes).apply(model, mesh)` raises in its checks, where `mesh` is
    `ParallelMesh.build(...)` with `degrees` on `device_type`, if the checks decide it without
    using the mesh's device meshes; None when they pass or cannot decide so.

    Never changes `model` (`Pipeline.validate` does not). Errors other than a `MoetxError` from
    a check are left to the caller's checks on the built mesh, which meet them again: None.
    Inside an initialised process group the answer is None too (the checks then run beside a
    real world, which `ParallelMesh.build` would use).

    Args:
        model: The model as the pipeline would get it (for a trace, its fresh meta copy).
        passes: The passes, in pipeline order.
        degrees: The mesh's degrees.
        device_type: The mesh's device type.
    """
    if not passes or dist.is_initialized():
        return None
    unbuilt = dict.fromkeys(
        ("root", "dense", "fsdp", "moe", "expert_fsdp", "tokens"), cast(DeviceMesh, _Unbuilt())
    )
    # every axis explicit, as `ParallelMesh.build` makes them
    mesh = _DegreesOnly(
        degrees=degrees, device_type=device_type, explicit_axes=frozenset(AXES), **unbuilt
    )
    try:
        Pipeline(tuple(passes)).validate(model, mesh)
    except MoetxError as e:
        cause: BaseException | None = e
        while cause is not None:  # made while handling a stopped check: undecided too
            if isinstance(cause, _MeshUsed):
                return None
            cause = cause.__cause__ or cause.__context__
        return e.with_traceback(None)  # its frames hold the model; the caller raises it anew
    except (_MeshUsed, Exception):  # undecided here; the checks on the built mesh say
        return None
    return None
