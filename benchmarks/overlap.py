"""Overlap: does hiding the expert dispatch all-to-all behind the shared expert pay off here?

Issue 17 item 4. One MoE layer's forward on each of 2 ranks, built from moetx's public pieces
(`moetx.models.layers.DenseMLP` as the shared expert, torch's functional `all_to_all_single` as
moetx's all-to-all dispatcher uses it): the token copies of this rank (`tokens x top_k` rows of
width H, fp32, split evenly between the ranks) are sent while the shared expert (intermediate
width = H, one shared expert as wide as a routed one in issue 17's workload) runs on the rank's
tokens. Issue 17's shape: seq 64 x global batch 8 over 2 ranks = 256 tokens per rank, top-2;
hidden 64, then wider to see the trend.

Per hidden size, four variants, repetitions interleaved (rotating order, all ranks started
together by a barrier): the all-to-all alone, the shared expert alone, serial (wait for the
all-to-all, then compute: moetx's order today) and overlapped (issue, compute, wait). Each
repetition's time is the slowest rank's; the table gives medians, `overlap / serial` (below 1:
overlap helps) and the best overlap could do, `max(a2a, shared) / serial`. The control (last
columns) puts a 2 ms idle wait (`time.sleep`) where the shared expert was: overlapped / serial
there says whether the collective progresses on its own at all, apart from competing for cores.

On gloo the collective runs on gloo's own threads while the rank's one compute thread works; on
a 2-core box shared by both ranks those threads compete for the same cores, which is what this
measures. `--backend nccl` runs it on one GPU per rank (`make gpu-check`), where the collective
runs on NCCL's stream.

Run: `python -m benchmarks.overlap [--hidden 64 256 1024] [--reps 200] [--backend gloo]`.
"""

from __future__ import annotations

import argparse
import statistics

from moetx.testing.ranks import BACKENDS, RankPool
from tests.bodies.overlap import MODES, overlap_times

TOKENS = 64 * 8 // 2  # seq 64 x global batch 8 rows, over 2 ranks
TOP_K = 2
IDLE_MS = 2.0


def _row(hidden: int, per_rank: list[dict[str, list[float]]]) -> str:
    slowest = {m: [max(ts) for ts in zip(*(r[m] for r in per_rank), strict=True)] for m in MODES}
    med = {m: 1e3 * statistics.median(v) for m, v in slowest.items()}
    q = {m: statistics.quantiles(v, n=4) for m, v in slowest.items()}
    # Per-repetition ratio (serial and overlapped ran back to back), its median and quartiles.
    ratios = sorted(o / s for o, s in zip(slowest["overlap"], slowest["serial"], strict=True))
    rq = statistics.quantiles(ratios, n=4)
    kib = TOKENS * TOP_K * hidden * 4 / 2 / 1024  # the half that leaves the rank
    best = max(med["all_to_all"], med["shared"]) / med["serial"]
    idle = med["idle_overlap"] / med["idle_serial"]
    idle_best = max(med["all_to_all"], IDLE_MS) / med["idle_serial"]
    return (
        f"| {hidden} | {kib:.0f} | {med['all_to_all']:.2f} | {med['shared']:.2f} | "
        f"{med['serial']:.2f} ({1e3 * q['serial'][0]:.2f}-{1e3 * q['serial'][2]:.2f}) | "
        f"{med['overlap']:.2f} ({1e3 * q['overlap'][0]:.2f}-{1e3 * q['overlap'][2]:.2f}) | "
        f"{med['overlap'] / med['serial']:.2f} | {statistics.median(ratios):.2f} "
        f"({rq[0]:.2f}-{rq[2]:.2f}) | {best:.2f} | {med['idle_serial']:.2f} | "
        f"{med['idle_overlap']:.2f} | {idle:.2f} | {idle_best:.2f} |"
    )


def main() -> None:
    """Print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--reps", type=int, default=200, help="timed repetitions per variant")
    ap.add_argument("--backend", choices=BACKENDS, default="gloo")
    args = ap.parse_args()
    print(
        "| hidden | KiB sent / rank | a2a ms | shared ms | serial ms (IQR) | overlapped ms (IQR) | "
        "overlapped / serial | per-rep ratio, median (IQR) | best possible | "
        f"control: serial ms, a2a + {IDLE_MS:g} ms idle | control: overlapped ms | "
        "control: overlapped / serial | control: best possible |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with RankPool(2, timeout=900, backend=args.backend) as pool:
        for hidden in args.hidden:
            res = pool.run(
                overlap_times, hidden, TOKENS, TOP_K, hidden, reps=args.reps, idle_s=IDLE_MS / 1e3
            )
            print(_row(hidden, res), flush=True)


if __name__ == "__main__":
    main()
