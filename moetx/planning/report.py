"""What a plan reports: per-rank bytes, parameter groups, the `Plan` value, and its tables."""

from __future__ import annotations

from collections.abc import Iterator

import attrs

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees

__all__ = ["ParamGroup", "Plan", "RankBytes", "human_bytes", "render"]


@attrs.frozen
class RankBytes:
    """Bytes one rank holds for training state.

    Attributes:
        params: Local shards of every parameter (unpadded, as `to_local()` holds them).
        grads: Local gradient shards of the trainable parameters (FSDP2 keeps gradients in
            the parameters' own dtype, whatever `reduce_dtype` is).
        optimizer: AdamW's `exp_avg` + `exp_avg_sq` (2x the trainable local shards, in the
            parameters' dtype, as `torch.optim.AdamW` allocates them; its per-parameter
            `step` scalars are not counted).
    """

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        """Parameters + gradients + optimizer state."""
        return self.params + self.grads + self.optimizer

    def __add__(self, other: RankBytes) -> RankBytes:
        return RankBytes(
            self.params + other.params, self.grads + other.grads, self.optimizer + other.optimizer
        )


@attrs.frozen
class ParamGroup:
    """Parameters whose FQNs differ only in layer indices and that are placed alike.

    Attributes:
        pattern: FQN with layer indices replaced by `*`, e.g. `model.layers.*.mlp.experts.down_proj`.
        count: How many parameters the group has (one per layer).
        passes: Stages of the applied passes that shard these parameters or transform their
            module (e.g. `("ep", "ac", "fsdp")`; `cp` marks attention, `ac` checkpointed blocks).
        mesh_axes: Names of the DTensor mesh's axes (empty: a plain tensor on every rank).
        mesh_shape: Degrees of those axes.
        placements: The DTensor placements, as `repr` strings.
        global_shape: Shape of one parameter.
        local_shape: Shape of one parameter's local shard on the plan's rank.
        dtype: Parameter dtype name.
        requires_grad: Whether the parameters are trained.
        bytes: What the plan's rank holds for the whole group.
    """

    pattern: str
    count: int
    passes: tuple[str, ...]
    mesh_axes: tuple[str, ...]
    mesh_shape: tuple[int, ...]
    placements: tuple[str, ...]
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    dtype: str
    requires_grad: bool
    bytes: RankBytes


@attrs.frozen
class Plan:
    """What `pipeline` does to a model on a mesh: parameter groups, per-rank bytes, warnings.

    Print it (or show it in a notebook) for a table; read the fields for numbers.

    Attributes:
        pipeline: The pipeline planned.
        degrees: The mesh degrees.
        rank: The rank whose local shapes the groups show.
        model: Class name of the model.
        num_parameters: Global parameter count (tied parameters once).
        groups: Parameter groups in model order.
        ranks: Bytes held by each rank, indexed by rank.
        resident_after_forward: Extra bytes per rank that `FSDP(reshard_after_forward=...)`
            keeps gathered from forward to backward (0 when it reshards).
        resident_experts_after_forward: The routed experts' part of it.
        warnings: Human-readable warnings (memory consequences of the configuration).
        notes: Human-readable notes (what `reshard_after_forward="auto"` chose).
        seconds: Wall time the plan took.
    """

    pipeline: Pipeline
    degrees: MeshDegrees
    rank: int
    model: str
    num_parameters: int
    groups: tuple[ParamGroup, ...]
    ranks: tuple[RankBytes, ...]
    resident_after_forward: int = 0
    resident_experts_after_forward: int = 0
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    seconds: float = attrs.field(default=0.0, eq=False)

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self.degrees.world_size

    @property
    def bytes(self) -> RankBytes:
        """Bytes the plan's rank holds."""
        return self.ranks[self.rank]

    @property
    def max_rank_bytes(self) -> int:
        """The largest per-rank total (ranks differ when a dim does not split evenly)."""
        return max(r.total for r in self.ranks)

    def __repr__(self) -> str:
        return (
            f"<Plan {self.pipeline!r} on {self.degrees!r}: {self.num_parameters:,} parameters, "
            f"rank {self.rank} holds {human_bytes(self.bytes.total)}>"
        )

    def __str__(self) -> str:
        return render(self, markdown=False)

    def _repr_markdown_(self) -> str:
        return render(self, markdown=True)


def human_bytes(n: int) -> str:
    """`n` bytes in GiB, MiB or KiB (binary units), two decimals."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def _rows(p: Plan) -> Iterator[list[str]]:
    yield ["parameters", "n", "passes", "mesh axes", "placements", "global shape",
           f"local (rank {p.rank})", "dtype", "params", "grads", "AdamW"]  # fmt: skip
    for g in p.groups:
        axes = " × ".join(f"{a}={s}" for a, s in zip(g.mesh_axes, g.mesh_shape, strict=True))
        yield [
            g.pattern,
            str(g.count),
            "+".join(g.passes) or "—",
            axes or "— (every rank)",
            ", ".join(g.placements) or "—",
            "×".join(map(str, g.global_shape)),
            "×".join(map(str, g.local_shape)),
            g.dtype + ("" if g.requires_grad else " (frozen)"),
            human_bytes(g.bytes.params),
            human_bytes(g.bytes.grads),
            human_bytes(g.bytes.optimizer),
        ]
    b = p.bytes
    yield [f"total on rank {p.rank}", "", "", "", "", "", "", "",
           human_bytes(b.params), human_bytes(b.grads), human_bytes(b.optimizer)]  # fmt: skip


def render(p: Plan, *, markdown: bool) -> str:
    """The plan as a text table (aligned columns) or a markdown table."""
    rows = list(_rows(p))
    d = p.degrees
    head = (
        f"plan: {p.pipeline!r}\n"
        f"mesh: world {p.world_size} = dp_replicate {d.dp_replicate} × dp_shard {d.dp_shard} × "
        f"cp {d.cp}{f' × tp {d.tp}' if d.tp > 1 else ''}; ep {d.ep} (ep_shard {d.ep_shard})\n"
        f"model: {p.model}, {p.num_parameters:,} parameters"
    )
    totals = sorted({r.total for r in p.ranks})
    spread = (
        human_bytes(totals[0])
        if len(totals) == 1
        else f"{human_bytes(totals[0])} … {human_bytes(totals[-1])}"
    )
    tail = [
        f"per rank: params + grads + AdamW = {human_bytes(p.bytes.total)} on rank {p.rank}; "
        f"{spread} across the {p.world_size} ranks",
        *(f"note: {n}" for n in p.notes),
        *(f"WARNING: {w}" for w in p.warnings),
        f"planned in {p.seconds:.1f} s",
    ]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|" + "---|" * len(rows[0]))
        return "\n\n".join([head.replace("\n", "  \n"), "\n".join(lines), "  \n".join(tail)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 8 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join([head, "", *lines, "", *tail])
