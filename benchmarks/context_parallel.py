"""Per-rank attention activation bytes and step time, cp=1 against `ContextParallel` at cp=2.

One `moetx.models.Attention` layer (H=256, 8 query heads, 2 KV heads, head_dim 32, batch 1,
fp32) runs forward + backward on 2 gloo ranks (one intra-op thread each). cp=1: each rank runs
the whole sequence alone (the baseline; torch's CPU flash SDPA). cp=2: the sequence is split
with `ContextParallel(comm=...).shard_sequence` (load-balanced) and the layer's core is the
kernel the pass installs. "Saved" is the bytes of the unique storages the layer saves for
backward (a `saved_tensors_hooks` meter; parameters excluded), on the rank that saves most;
"step" is the median forward + backward time of the slowest rank, ranks started together
after a barrier. Both are per rank.

Run: `python -m benchmarks.context_parallel [--seq 1024 2048 4096] [--steps 5]`. Prints a
markdown table. Timings on a shared 2-core machine are noisy; bytes are deterministic.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from moetx.testing.ranks import RankPool
from tests.bodies.context_parallel import BenchCase, bench_attention


def cp_table(make_case: Callable[..., Any], body: Callable[..., Any]) -> None:
    """Parse `--seq/--steps/--warmup`, run `body(make_case(seq_len, cp, comm))` on 2 ranks for
    cp=1 and cp=2 (both comm modes), and print the markdown table (shared with the HF one)."""
    parser = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or "").strip())
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    print(
        "| seq len | cp | comm | saved MiB / rank | saved vs cp=1 | step ms (slowest rank) | "
        "step vs cp=1 |"
    )
    print("|---|---|---|---|---|---|---|")
    with RankPool(2, timeout=600) as pool:
        for seq in args.seq:
            base: tuple[float, float] | None = None
            for cp, comm in ((1, "-"), (2, "allgather"), (2, "p2p")):
                case = make_case(seq_len=seq, cp=cp, comm=comm)
                results = pool.run(body, case, warmup=args.warmup, steps=args.steps)
                saved = max(r["saved_bytes"] for r in results) / 2**20
                step = 1e3 * max(r["time"] for r in results)
                base = base or (saved, step)
                print(
                    f"| {seq} | {cp} | `{comm}` | {saved:.1f} | {saved / base[0]:.2f} | "
                    f"{step:.1f} | {step / base[1]:.2f} |",
                    flush=True,
                )


def main() -> None:
    """The attention-layer table."""
    cp_table(BenchCase, bench_attention)


if __name__ == "__main__":
    main()
