"""Tensor parallelism: per-rank bytes, step time and collectives of TP | EP | FSDP vs EP | FSDP.

Same 4 gloo ranks, same model and global batch: `EP | FSDP` on dp 4 (ep 2) against
`TP | EP | FSDP` on dp 2 x tp 2 (ep 2) and with sequence parallelism. Bytes are each rank's local
parameter and gradient shards; collectives are counted over one training step (forward,
backward, optimizer) by op name; step time is the median of `--steps` steps after 2 warm-up
steps, interleaved per configuration in one run (compare ratios within the table).

Run: `python -m benchmarks.tensor_parallel [--steps 5]` from the repository root.
"""

from __future__ import annotations

import argparse

from moetx import FSDP, ExpertParallel, MeshDegrees, TensorParallel
from moetx.models import MoEConfig
from moetx.testing.ranks import RankPool
from moetx.testing.train import TrainSpec
from tests.bodies.tensor_parallel import bench_step

CONFIG = MoEConfig(
    vocab_size=1024, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
    num_experts=8, top_k=2, expert_hidden_size=256, num_shared_experts=1,
)  # fmt: skip
GLOBAL_ROWS = 8
CASES = [
    ("EP | FSDP", ExpertParallel() | FSDP(), MeshDegrees(dp_shard=4, ep=2)),
    (
        "TP | EP | FSDP",
        TensorParallel() | ExpertParallel() | FSDP(),
        MeshDegrees(dp_shard=2, ep=2, tp=2),
    ),
    (
        "TP(sp) | EP | FSDP",
        TensorParallel(sequence_parallel=True) | ExpertParallel() | FSDP(),
        MeshDegrees(dp_shard=2, ep=2, tp=2),
    ),
]


def main() -> None:
    """Print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    print("| pipeline | mesh | params KiB/rank | grads KiB/rank | step ms (median) | ratio | "
          "collectives per step | by kind |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    base = None
    with RankPool(4, timeout=600) as pool:
        for name, pipeline, degrees in CASES:
            # the same global batch (8 rows) everywhere: tp ranks share their data rank's rows
            rows = GLOBAL_ROWS // (degrees.dp_replicate * degrees.dp_shard)
            spec = TrainSpec(config=CONFIG, rows_per_rank=rows, seq_len=256, lr=1e-3)
            res = pool.run(bench_step, spec, pipeline, degrees, args.steps)
            r0 = res[0]
            ms = 1e3 * max(r["seconds"] for r in res)
            base = base or ms
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(r0["collectives"].items()))
            print(
                f"| `{name.replace('|', chr(92) + '|')}` | {degrees!r} | {r0['param_bytes'] / 1024:.0f} | "
                f"{r0['grad_bytes'] / 1024:.0f} | {ms:.1f} | {ms / base:.2f} | "
                f"{sum(r0['collectives'].values())} | {kinds} |"
            )


if __name__ == "__main__":
    main()
