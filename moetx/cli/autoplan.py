"""`moetx autoplan`: the meshes and pipelines that fit a memory budget, best first."""

from __future__ import annotations

import argparse
import re
import sys
import time

from moetx.core.errors import MoetxError
from moetx.models import MoEConfig
from moetx.planning import CostModel, autoplan

#: Models `--model` accepts.
MODELS: tuple[str, ...] = ("tiny", "deepseek-v3")
_UNITS = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_UNITS |= {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_bytes(text: str) -> int:
    """`"80GiB"`, `"200 KiB"`, `"1e9"` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 80GiB or 512MiB (got {text!r})")
    return int(float(m.group(1)) * _UNITS[unit])


def main(argv: list[str] | None = None) -> int:
    """Entry point of `moetx autoplan`; 0 when something fits, 1 when nothing does, 2 on bad input."""
    ap = argparse.ArgumentParser(
        prog="moetx autoplan",
        description="Rank the meshes and pipelines that fit a per-rank memory budget by bytes "
        "moved per token.",
    )
    ap.add_argument("--model", choices=MODELS, default="tiny", help="model (default tiny)")
    ap.add_argument("--world", type=int, default=None, help="ranks (default 256 / 4)")
    ap.add_argument("--memory", type=parse_bytes, default=None, help="per rank, e.g. 80GiB")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 4096 / 16)")
    ap.add_argument("--micro-batch", type=int, default=1, help="rows per data rank")
    ap.add_argument(
        "--passes",
        default="cp,ep,ac,fsdp",
        help="passes allowed, comma-separated (add tp to try it)",
    )
    ap.add_argument("--ac-modes", default="none,router,selective,full,full/2")
    ap.add_argument("--max-cp", type=int, default=8, help="largest cp degree tried")
    ap.add_argument("--bandwidth", type=parse_bytes, default=None, help="bytes/s (ranks by time)")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds per collective")
    ap.add_argument("--top", type=int, default=10, help="rows to print")
    args = ap.parse_args(argv)

    deepseek = args.model == "deepseek-v3"
    config = (
        MoEConfig.deepseek_v3_shaped()
        if deepseek
        else MoEConfig(num_experts=4, num_shared_experts=1, num_layers=3, num_dense_layers=1)
    )
    world = args.world or (256 if deepseek else 4)
    memory = args.memory or (80 * 2**30 if deepseek else 200 * 2**10)
    seq = args.seq or (4096 if deepseek else 16)
    cost = CostModel(bandwidth=float(args.bandwidth or 1.0), latency=args.latency)
    start = time.perf_counter()
    try:
        result = autoplan(
            config,
            world=world,
            memory_per_rank=memory,
            seq=seq,
            micro_batch=args.micro_batch,
            passes_allowed=[p.strip() for p in args.passes.split(",") if p.strip()],
            ac_modes=[m.strip() for m in args.ac_modes.split(",") if m.strip()],
            cost=cost,
            max_cp=args.max_cp,
        )
    except (MoetxError, ValueError) as e:
        print(f"moetx autoplan: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"model: {args.model}, world {world}, seq {seq}, micro-batch {args.micro_batch}")
    if result.fits:
        print(f"{result}".replace(result.table(), result.table(args.top)))
        best = result.best
        print(f"best: {best.pipeline!r} with {best.degrees!r}")
    else:
        print(result)
    print(f"moetx autoplan took {time.perf_counter() - start:.1f} s")
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
