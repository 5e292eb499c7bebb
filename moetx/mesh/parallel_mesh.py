"""`ParallelMesh`: the named device-mesh axes every pass works on, built from degrees.

Vocabulary (torchtitan's): an *axis* is a mesh dimension, a *dim* is a tensor dimension, a
*degree* is the size of an axis. Axes:

- dense: `dp_replicate` (HSDP replicas) x `dp_shard` x `cp`; FSDP shards dense parameters over
  `dp_shard_cp` = dp_shard x cp (context-parallel ranks hold the same parameters).
- MoE: expert parallelism borrows its ranks from dp_shard x cp, as torchtitan and NeMo Automodel
  do: that group is split into `ep_shard` x `ep`, where `ep` ranks hold different experts and
  `ep_shard` ranks (the data ranks left over per expert group) shard the same experts with FSDP.

All sub-meshes are carved with `_unflatten` out of one 1-D root mesh, so the expert-FSDP mesh
and the EP mesh share a root and FSDP2 can shard parameters that are already EP DTensors.
"""

from __future__ import annotations

import weakref
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moetx.core import seams
from moetx.core.errors import MeshAxisError, MeshError

#: Names a `ParallelMesh` answers to.
AXES: tuple[str, ...] = ("dp_replicate", "dp_shard", "cp", "ep", "ep_shard", "dp_shard_cp", "tp")
#: Dims a user's own DeviceMesh may have, in this order (row-major rank layout).
DEVICE_MESH_DIMS: tuple[str, ...] = ("dp_replicate", "dp_shard", "cp", "tp")


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MeshError(f"`{name}` ({value!r}) must be a positive integer.")


def _positive_int(_: object, attr: attrs.Attribute, value: object) -> None:
    _check_positive(attr.name, value)


@attrs.frozen(kw_only=True)
class MeshDegrees:
    """Validated degrees of every axis; pure data, needs no process group.

    Use `MeshDegrees.resolve` to infer `dp_shard` from a world size.
    """

    dp_replicate: int = attrs.field(default=1, validator=_positive_int)
    dp_shard: int = attrs.field(default=1, validator=_positive_int)
    cp: int = attrs.field(default=1, validator=_positive_int)
    ep: int = attrs.field(default=1, validator=_positive_int)
    tp: int = attrs.field(default=1, validator=_positive_int)

    def __repr__(self) -> str:
        tp = f", tp={self.tp}" if self.tp != 1 else ""
        return (
            f"MeshDegrees(dp_replicate={self.dp_replicate}, dp_shard={self.dp_shard}, "
            f"cp={self.cp}, ep={self.ep}{tp})"
        )

    def __attrs_post_init__(self) -> None:
        if (self.dp_shard * self.cp) % self.ep:
            raise MeshError(
                f"`ep` ({self.ep}) must divide `dp_shard × cp` ({self.dp_shard} × {self.cp} = "
                f"{self.dp_shard * self.cp}): expert parallelism borrows its ranks from the "
                "data-parallel and context-parallel ranks.\n"
                "  fix: pick an ep that divides dp_shard × cp, or raise dp_shard."
            )

    @property
    def world_size(self) -> int:
        """Number of ranks the mesh spans."""
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def token_ranks(self) -> int:
        """Ranks holding different tokens: dp_replicate x dp_shard x cp (tp ranks share theirs).

        Gradients are averaged over these ranks; a global token count sums over them.
        """
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def ep_shard(self) -> int:
        """Data ranks left over per expert group: they FSDP-shard the same experts."""
        return self.dp_shard * self.cp // self.ep

    @property
    def dp_shard_cp(self) -> int:
        """Ranks that FSDP-shard dense parameters."""
        return self.dp_shard * self.cp

    def degree(self, axis: str) -> int:
        """The degree of a named axis (see `AXES`)."""
        if axis not in AXES:
            raise MeshAxisError(f"`{axis}` is not a moetx mesh axis; the axes are {AXES}.")
        return int(getattr(self, axis))

    @classmethod
    def resolve(
        cls,
        world_size: int,
        *,
        dp_replicate: int = 1,
        dp_shard: int = -1,
        cp: int = 1,
        ep: int = 1,
        tp: int = 1,
    ) -> MeshDegrees:
        """Degrees for `world_size` ranks; `dp_shard=-1` takes whatever ranks are left."""
        for name, v in (("dp_replicate", dp_replicate), ("cp", cp), ("ep", ep), ("tp", tp)):
            _check_positive(name, v)
        if dp_shard == -1:
            fixed = dp_replicate * cp * tp
            if world_size % fixed:
                what = "dp_replicate × cp" + (" × tp" if tp > 1 else "")
                parts = f"{dp_replicate} × {cp}" + (f" × {tp}" if tp > 1 else "")
                raise MeshError(
                    f"The world size ({world_size}) is not divisible by `{what}` "
                    f"({parts} = {fixed}), so `dp_shard` cannot be inferred."
                )
            dp_shard = world_size // fixed
        degrees = cls(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, ep=ep, tp=tp)
        if degrees.world_size != world_size:
            what = "dp_replicate × dp_shard × cp" + (" × tp" if tp > 1 else "")
            parts = f"{dp_replicate} × {dp_shard} × {cp}" + (f" × {tp}" if tp > 1 else "")
            raise MeshError(
                f"`{what}` ({parts} = {degrees.world_size}) must equal the world size "
                f"({world_size}).\n"
                "  fix: leave `dp_shard` out (it is inferred) or change the degrees."
            )
        return degrees


@attrs.frozen(eq=False)
class ParallelMesh:
    """The device meshes every pass needs, carved out of one root mesh.

    Build with `ParallelMesh.build(cp=2, ep=4)` inside an initialised process group, or wrap a
    DeviceMesh you already have with `ParallelMesh.from_device_mesh`. Index by axis name to get
    a 1-D DeviceMesh: `mesh["ep"]`.
    """

    degrees: MeshDegrees
    device_type: str
    root: DeviceMesh = attrs.field(repr=False)
    dense: DeviceMesh = attrs.field(repr=False)  # (dp_replicate, dp_shard, cp, tp)
    fsdp: DeviceMesh = attrs.field(repr=False)  # (dp_replicate, dp_shard_cp, tp)
    moe: DeviceMesh = attrs.field(repr=False)  # (dp_replicate, ep_shard, ep, tp)
    expert_fsdp: DeviceMesh = attrs.field(repr=False)  # 1-D: dp_replicate x ep_shard
    tokens: DeviceMesh = attrs.field(repr=False)  # 1-D: the token ranks (every axis but tp)
    explicit_axes: frozenset[str] = frozenset(AXES)

    @classmethod
    def build(
        cls,
        *,
        dp_replicate: int = 1,
        dp_shard: int = -1,
        cp: int = 1,
        ep: int = 1,
        tp: int = 1,
        device_type: str | None = None,
    ) -> ParallelMesh:
        """Build the meshes for the current process group (gloo, NCCL or fake)."""
        if not dist.is_initialized():
            raise MeshError(
                "`ParallelMesh.build` needs an initialised process group (none is).\n"
                "  fix: call `torch.distributed.init_process_group(...)` first, or run under "
                "`torchrun`."
            )
        degrees = MeshDegrees.resolve(
            dist.get_world_size(),
            dp_replicate=dp_replicate,
            dp_shard=dp_shard,
            cp=cp,
            ep=ep,
            tp=tp,
        )
        device_type = device_type or _default_device_type()
        root = init_device_mesh(device_type, (degrees.world_size,), mesh_dim_names=("world",))
        return cls._carve(degrees, device_type, root, frozenset(AXES))

    @classmethod
    def from_device_mesh(cls, mesh: DeviceMesh, *, ep: int = 1) -> ParallelMesh:
        """Wrap a user's DeviceMesh whose dims are named among `DEVICE_MESH_DIMS` (in order)."""
        names = tuple(mesh.mesh_dim_names or ())
        unknown = [n for n in names if n not in DEVICE_MESH_DIMS]
        if not names or unknown or list(names) != [d for d in DEVICE_MESH_DIMS if d in names]:
            raise MeshAxisError(
                f"A DeviceMesh given to moetx must name its dims among {DEVICE_MESH_DIMS}, in "
                f"that order (got {names or 'no names'}).\n"
                "  fix: use `ParallelMesh.build(dp_shard=..., cp=..., ep=...)`."
            )
        sizes = dict(zip(names, mesh.shape, strict=True))
        degrees = MeshDegrees(
            dp_replicate=sizes.get("dp_replicate", 1),
            dp_shard=sizes.get("dp_shard", 1),
            cp=sizes.get("cp", 1),
            ep=ep,
            tp=sizes.get("tp", 1),
        )
        root = mesh if mesh.ndim == 1 else mesh._flatten("moetx_world")
        explicit = frozenset(names) | ({"ep", "ep_shard"} if ep > 1 else frozenset())
        explicit |= {"dp_shard_cp"} if {"dp_shard", "cp"} & set(names) else frozenset()
        return cls._carve(degrees, mesh.device_type, root, explicit)

    @classmethod
    def _carve(
        cls, d: MeshDegrees, device_type: str, root: DeviceMesh, explicit: frozenset[str]
    ) -> ParallelMesh:
        def carve(sizes: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
            return root._unflatten(
                0, sizes, names, backend_override=_same_timeout(device_type, names)
            )

        # tp is the innermost axis: its ranks are neighbours (the fastest links on a GPU node).
        dense = carve((d.dp_replicate, d.dp_shard, d.cp, d.tp), DEVICE_MESH_DIMS)
        fsdp = carve((d.dp_replicate, d.dp_shard_cp, d.tp), ("dp_replicate", "dp_shard_cp", "tp"))
        moe = carve(
            (d.dp_replicate, d.ep_shard, d.ep, d.tp), ("dp_replicate", "ep_shard", "ep", "tp")
        )
        if d.dp_replicate == 1:
            expert_fsdp = moe["ep_shard"]
        else:
            expert_fsdp = moe["dp_replicate", "ep_shard"]._flatten(
                "ep_fsdp", backend_override=_timeout_options(device_type)
            )
        tokens = (
            root
            if d.tp == 1
            else fsdp["dp_replicate", "dp_shard_cp"]._flatten(
                "tokens", backend_override=_timeout_options(device_type)
            )
        )
        return cls(d, device_type, root, dense, fsdp, moe, expert_fsdp, tokens, explicit)

    def __getitem__(self, axis: str) -> DeviceMesh:
        """The 1-D mesh of one axis (its degree may be 1)."""
        if axis in ("dp_shard", "cp", "tp"):
            return self.dense[axis]
        if axis == "dp_replicate":
            return self.fsdp[axis]
        if axis == "dp_shard_cp":
            return self.fsdp[axis]
        if axis in ("ep", "ep_shard"):
            return self.moe[axis]
        raise MeshAxisError(f"`{axis}` is not a moetx mesh axis; the axes are {AXES}.")

    def degree(self, axis: str) -> int:
        """The degree (size) of a named axis."""
        return self.degrees.degree(axis)

    def require(self, axis: str, *, by: str) -> DeviceMesh:
        """Return the 1-D mesh of `axis`, or raise `MeshAxisError` naming the pass `by`."""
        if axis not in AXES or axis not in self.explicit_axes:
            present = tuple(sorted(self.explicit_axes))
            raise MeshAxisError(
                f"`{by}` needs the mesh axis `{axis}`, which this mesh does not have "
                f"(its axes: {present}).\n"
                f"  fix: build the mesh with `ParallelMesh.build(...)`, which has every axis."
            )
        return self[axis]

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self.degrees.world_size

    @property
    def data_rank(self) -> int:
        """This rank's data-parallel position: which rows of a global batch it reads.

        Counted over dp_replicate x dp_shard (cp ranks of one group share rows and split the
        sequence; ep borrows its ranks from these, so it adds nothing), in `[0, data_size)`.
        """
        replica, shard, _, _ = self.dense.get_coordinate() or (0, 0, 0, 0)
        return replica * self.degrees.dp_shard + shard

    @property
    def data_size(self) -> int:
        """Number of data-parallel positions: dp_replicate x dp_shard."""
        return self.degrees.dp_replicate * self.degrees.dp_shard

    def dense_fsdp_mesh(self) -> DeviceMesh:
        """Mesh FSDP shards dense parameters over: dp_shard x cp, with dp_replicate for HSDP."""
        if self.degrees.dp_replicate > 1:
            return self.fsdp["dp_replicate", "dp_shard_cp"]
        return self.fsdp["dp_shard_cp"]

    def expert_fsdp_mesh(self) -> DeviceMesh:
        """1-D mesh FSDP shards expert parameters over: every rank holding the same experts.

        That is ep_shard, times dp_replicate under HSDP. It is flat on purpose: a 2-D
        (replicate x shard) expert mesh with forced SUM reduction gave expert gradients at
        0.25x the reference in torch 2.13 (TORCH-CPU-NOTES §4.3); a flat mesh is right.
        """
        return self.expert_fsdp

    def __repr__(self) -> str:
        d = self.degrees
        return (
            f"ParallelMesh(dp_replicate={d.dp_replicate}, dp_shard={d.dp_shard}, cp={d.cp}, "
            f"ep={d.ep}{f', tp={d.tp}' if d.tp > 1 else ''}, device_type={self.device_type!r})"
        )


def _same_timeout(device_type: str, names: tuple[str, ...]) -> dict[str, Any] | None:
    """Backend options giving every sub-mesh group the default group's timeout.

    Without them `_unflatten` creates groups with torch's built-in default (30 min on gloo),
    whatever timeout `init_process_group` was given: a rank that failed would leave its peers
    blocked in an expert all-to-all for half an hour instead of the configured timeout.
    """
    opts = _timeout_options(device_type)
    return None if opts is None else {name: opts for name in names}


def _timeout_options(device_type: str) -> Any:
    """Backend options carrying the default group's timeout (None: fake backend or unknown).

    For every group moetx creates: `_unflatten` (via `_same_timeout`) and `_flatten` take
    torch's 30-minute default otherwise (TORCH-CPU-NOTES §9).
    """
    backend = dist.get_backend()
    try:
        world = dist.group.WORLD._get_backend(torch.device(device_type))  # type: ignore[union-attr]
        timeout = world.options._timeout
    except (RuntimeError, AttributeError):  # fake backend, or no options to copy
        return None
    if backend == "gloo":
        opts: Any = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    elif backend == "nccl" and hasattr(dist, "ProcessGroupNCCL"):
        opts = dist.ProcessGroupNCCL.Options()
    else:
        return None
    opts._timeout = timeout
    return opts


def _default_device_type() -> str:
    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    return "cuda" if backend == "nccl" else "cpu"


#: `(default group, ParallelMesh.from_device_mesh(m))` per DeviceMesh `m` given to
#: `as_parallel_mesh`. Each conversion carves new sub-meshes (about 8 gloo groups, 35 fds and
#: hidden collectives), so a loop passing a DeviceMesh to `shard_sequence` ran out of file
#: descriptors. An entry lives as long as its mesh; the ParallelMesh refers to that mesh, so in
#: practice for the process (one per distinct mesh: equal meshes, same ranks and names, share
#: one). An entry made under another default group (destroyed and created again) is rebuilt.
_FROM_DEVICE_MESH: weakref.WeakKeyDictionary[DeviceMesh, tuple[Any, ParallelMesh]] = (
    weakref.WeakKeyDictionary()
)


def as_parallel_mesh(mesh: ParallelMesh | DeviceMesh) -> ParallelMesh:
    """Accept a `ParallelMesh` or a named `DeviceMesh`; anything else is a `TypeError`.

    A DeviceMesh is converted once (collectively, on first use) and the result reused.
    """
    if isinstance(mesh, ParallelMesh):
        return mesh
    if isinstance(mesh, DeviceMesh):
        world, entry = dist.group.WORLD, _FROM_DEVICE_MESH.get(mesh)
        if entry is None or entry[0] is not world:
            _FROM_DEVICE_MESH.pop(mesh, None)  # keyed by this mesh from now on, not a stale twin
            entry = _FROM_DEVICE_MESH[mesh] = (world, ParallelMesh.from_device_mesh(mesh))
        return entry[1]
    raise TypeError(
        f"`mesh` must be a `moetx.ParallelMesh` or a `DeviceMesh` (got `{type(mesh).__name__}`).\n"
        "  fix: `mesh = moetx.ParallelMesh.build(ep=2)` inside an initialised process group."
    )


def _coerce(mesh: Any) -> ParallelMesh:
    # The name is looked up per call, so `as_parallel_mesh` stays the single definition.
    return as_parallel_mesh(mesh)


seams.install_mesh_coercion(_coerce)
