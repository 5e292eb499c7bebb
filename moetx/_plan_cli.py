"""How a `Plan` reads: its text and markdown tables, and the `moetx plan` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs

from moetx._errors import MoetxError
from moetx._mesh import MeshDegrees

if TYPE_CHECKING:
    from moetx._plan import Plan

#: Models `--model` accepts.
MODELS: tuple[str, ...] = ("tiny", "deepseek-v3")


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
        f"cp {d.cp}; ep {d.ep} (ep_shard {d.ep_shard})\n"
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


def _reshard(text: str) -> bool | int:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true, false or an int (got {text!r})") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of `moetx plan`; returns the process exit code."""
    ap = argparse.ArgumentParser(
        prog="moetx plan",
        description="Print what a pipeline does to a model on a mesh, per parameter group and rank.",
    )
    ap.add_argument("--model", choices=MODELS, default="tiny", help="model to plan (default tiny)")
    ap.add_argument(
        "--world",
        type=int,
        default=None,
        help="world size (default: 256 for deepseek-v3, 2 for tiny)",
    )
    ap.add_argument(
        "--pipeline", default="ep|ac|fsdp", help="passes joined by '|' (default ep|ac|fsdp)"
    )
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel degree")
    ap.add_argument("--cp", type=int, default=1, help="context-parallel degree")
    ap.add_argument("--dp-replicate", type=int, default=1, help="HSDP replicas")
    ap.add_argument("--rank", type=int, default=0, help="rank whose local shapes to show")
    ap.add_argument(
        "--reshard-after-forward", type=_reshard, default=True, metavar="{true,false,N}"
    )
    ap.add_argument("--param-dtype", default=None, choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    from moetx._demo import parse_pipeline
    from moetx._pipeline import Pipeline
    from moetx._plan import plan
    from moetx.models import MoEConfig
    from moetx.passes import FSDP

    deepseek = args.model == "deepseek-v3"
    world = args.world if args.world is not None else (256 if deepseek else 2)
    config = (
        MoEConfig.deepseek_v3_shaped()
        if deepseek
        else MoEConfig(num_experts=4, num_shared_experts=1)
    )
    try:
        fsdp = {
            "reshard_after_forward": args.reshard_after_forward,
            "param_dtype": args.param_dtype,
        }
        pipeline = Pipeline(
            attrs.evolve(p, **fsdp) if isinstance(p, FSDP) else p
            for p in parse_pipeline(args.pipeline)
        )
        degrees = MeshDegrees.resolve(world, dp_replicate=args.dp_replicate, cp=args.cp, ep=args.ep)
        result = plan(pipeline, config, degrees, rank=args.rank)
    except (MoetxError, ValueError) as e:
        print(f"moetx plan: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(result._repr_markdown_() if args.markdown else result)
    print(
        f"moetx plan took {time.perf_counter() - start:.1f} s: build on meta, apply on a fake world "
        f"of {world}, read placements (the torch import before it not included)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
