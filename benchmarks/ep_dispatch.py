"""Bytes moved and step time of `ExpertParallel`'s two token dispatchers on CPU gloo ranks.

One synthetic MoE layer (E=8 experts, k=2, H=256, I=128, 512 tokens per rank, fp32, router as
initialised, no shared experts) runs forward + backward on 2 and 4 ranks, ep = world size. For
each rank the bytes that leave it are read from the split sizes (and tensor shapes) actually
passed to the functional collectives, forward and backward, by a dispatch mode that sees every
`_c10d_functional` op (`tests.bodies.expert_parallel._CollectiveLog`). The minimum is the
routed (token, k) copies whose expert lives on another rank, times H times 4 bytes, counted out
and back, forward and backward. The int64 metadata (the count exchange; for all-gather also the
token counts and expert ids) is reported separately and left out of the ratio.

Run: `python -m benchmarks.ep_dispatch [--tokens 512] [--steps 20]`. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics

from moetx.testing.ranks import RankPool
from tests.bodies.expert_parallel import MoECase, bench_layer


def _row(world: int, dispatcher: str, results: list[dict]) -> str:
    data = [sum(v for k, v in r["bytes"].items() if k.endswith("[data]")) for r in results]
    meta = [sum(v for k, v in r["bytes"].items() if k.endswith("[int64]")) for r in results]
    minimum = [r["minimum"] for r in results]
    ratio = sum(data) / sum(minimum) if sum(minimum) else float("nan")
    step_ms = 1e3 * max(r["time"] for r in results)
    return (
        f"| {world} | `{dispatcher}` | {statistics.mean(data) / 1024:.1f} | "
        f"{statistics.mean(minimum) / 1024:.1f} | {ratio:.2f} | "
        f"{statistics.mean(meta):.0f} | {step_ms:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    print(
        "| ranks (= ep) | dispatcher | data KiB sent / rank / step (fwd+bwd) | minimum KiB | "
        "measured / minimum | int64 metadata B / rank / step | step ms (slowest rank, median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for world in (2, 4):
        with RankPool(world, timeout=300) as pool:
            for dispatcher in ("all_to_all", "all_gather"):
                case = MoECase(
                    num_experts=8,
                    top_k=2,
                    hidden_size=256,
                    expert_hidden_size=128,
                    tokens_per_rank=(args.tokens,) * world,
                    shared=False,
                    routing="random",
                    dispatcher=dispatcher,
                    degree=world,
                )
                results = pool.run(bench_layer, case, warmup=args.warmup, steps=args.steps)
                print(_row(world, dispatcher, results), flush=True)


if __name__ == "__main__":
    main()
