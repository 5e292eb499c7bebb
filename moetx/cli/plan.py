"""`moetx plan`: print what a pipeline does to a model on a mesh, per parameter group and rank."""

from __future__ import annotations

import argparse
import sys
import time

import attrs

from moetx.cli.args import check_ranges, parse_pipeline
from moetx.core.algebra import Pipeline
from moetx.core.errors import CommandLineError, MoetxError
from moetx.mesh import MeshDegrees
from moetx.models import MoEConfig
from moetx.passes import FSDP
from moetx.planning import plan

#: Models `--model` accepts.
MODELS: tuple[str, ...] = ("tiny", "deepseek-v3")


def _reshard(text: str) -> bool | int | str:
    lowered = text.lower()
    if lowered == "auto":
        return lowered
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected auto, true, false or an int (got {text!r})"
        ) from None


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
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    ap.add_argument("--dp-replicate", type=int, default=1, help="HSDP replicas")
    ap.add_argument("--rank", type=int, default=0, help="rank whose local shapes to show")
    ap.add_argument(
        "--reshard-after-forward", type=_reshard, default="auto", metavar="{auto,true,false,N}"
    )
    ap.add_argument("--param-dtype", default=None, choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    deepseek = args.model == "deepseek-v3"
    world = args.world if args.world is not None else (256 if deepseek else 2)
    try:
        minimums = dict.fromkeys(("world", "ep", "cp", "dp_replicate"), 1) | {"rank": 0}
        below = {"rank": (world, "the world size")} if world >= 1 else {}
        check_ranges("moetx plan", args, minimums, below=below)
    except CommandLineError as e:
        print(f"moetx plan: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    config = (
        MoEConfig.deepseek_v3_shaped()
        if deepseek
        else MoEConfig(num_experts=4, num_shared_experts=1, num_heads=4, num_kv_heads=2)
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
        degrees = MeshDegrees.resolve(
            world, dp_replicate=args.dp_replicate, cp=args.cp, ep=args.ep, tp=args.tp
        )
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
