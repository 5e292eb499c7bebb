"""Token dedup in the all-to-all expert dispatcher: bytes, collectives and step time, off vs on.

Issue 17 item 3. The step-anatomy workload shape (hidden 64, 4 layers, 8 experts top-2, no
shared expert, seq 64, global batch 8 rows, fp32), `ExpertParallel()` against
`ExpertParallel(dedup=True)` (no FSDP: only the dispatcher's collectives), on 2 ranks (ep 2) and
4 ranks (ep 2 twice, and ep 4); a top-1 row shows the cost when no token has two experts on one
rank. Per row, averaged over ranks, one forward + backward: the bytes the EP all-to-alls send to
other ranks (rows actually passed to `_c10d_functional.all_to_all_single`, counted by a dispatch
mode on every rank; int64 count exchange apart), the minimum (each distinct remote (token, rank)
pair's hidden row once per all-to-all: dispatch and combine, forward and backward), both ratios,
the collectives per step, and the step time (forward + backward) of dedup on over off, wall and
process CPU (the rank's threads, gloo's included: less sensitive to a loaded box): per step
the slowest rank's on / off, steps interleaved in one run, the median of those ratios.

Run: `python -m benchmarks.dedup [--steps 15]`. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics

import attrs

from moetx import MeshDegrees
from moetx.models import MoEConfig
from moetx.testing.ranks import RankPool
from moetx.testing.train import TrainSpec
from tests.bodies.dedup import bench_dedup

CONFIG = MoEConfig(
    vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
    num_experts=8, top_k=2, expert_hidden_size=64, num_shared_experts=0,
)  # fmt: skip
SEQ = 64
GLOBAL_ROWS = 8
#: (ranks, mesh, top-k)
CASES = [
    (2, MeshDegrees(dp_shard=2, ep=2), 2),
    (2, MeshDegrees(dp_shard=2, ep=2), 1),
    (4, MeshDegrees(dp_shard=4, ep=2), 2),
    (4, MeshDegrees(dp_shard=4, ep=4), 2),
]


def _row(world: int, degrees: MeshDegrees, k: int, res: list[dict]) -> str:
    def mean(setting: str, key: str) -> float:
        return sum(r[setting][key] for r in res) / len(res)

    off, on = "dedup=False", "dedup=True"
    minimum = mean(on, "pairs") * 2 * CONFIG.hidden_size * 4
    calls = {s: {r[s]["calls"] for r in res} for s in (off, on)}
    ratios = []
    for kind in (0, 1):  # wall, CPU: the slowest rank's step, on over off, median over steps
        per_step = [
            max(r[on]["times"][i][kind] for r in res) / max(r[off]["times"][i][kind] for r in res)
            for i in range(len(res[0][on]["times"]))
        ]
        ratios.append(statistics.median(per_step))
    return (
        f"| {world} | ep={degrees.ep} | {k} | {mean(off, 'data') / 1024:.1f} | "
        f"{mean(on, 'data') / 1024:.1f} | {mean(on, 'data') / mean(off, 'data'):.3f} | "
        f"{minimum / 1024:.1f} | {mean(off, 'data') / minimum:.3f} | "
        f"{mean(on, 'data') / minimum:.3f} | {mean(off, 'int64'):.0f} / {mean(on, 'int64'):.0f} | "
        f"{'/'.join(map(str, sorted(calls[off])))} / {'/'.join(map(str, sorted(calls[on])))} | "
        f"{ratios[0]:.2f} | {ratios[1]:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per setting")
    args = parser.parse_args()
    print(
        "| ranks | mesh | top-k | KiB sent / rank / step, off | on | on / off | minimum KiB | "
        "off / minimum | on / minimum | int64 B off / on | EP collectives / step off / on | "
        "step time on / off | CPU time on / off |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    pools: dict[int, RankPool] = {}
    try:
        for world, degrees, k in CASES:
            if world not in pools:
                for pool in pools.values():
                    pool.close()
                pools = {world: RankPool(world, timeout=600)}
            data_ranks = degrees.dp_replicate * degrees.dp_shard
            spec = TrainSpec(
                config=attrs.evolve(CONFIG, top_k=k),
                rows_per_rank=GLOBAL_ROWS // data_ranks,
                seq_len=SEQ,
            )
            res = pools[world].run(bench_dedup, spec, degrees, steps=args.steps)
            print(_row(world, degrees, k, res), flush=True)
    finally:
        for pool in pools.values():
            pool.close()


if __name__ == "__main__":
    main()
