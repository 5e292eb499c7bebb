"""Time to build the DeepSeek-V3-shaped model on `meta` and plan it at world size 256.

`Pipeline.plan` applies the real pipeline to a `meta` copy under torch's fake process group, so
its time is the pipeline's apply time on that model plus reading the placements back.

Run: `python -m benchmarks.plan_time`. Prints a markdown table (median of 3 runs each).
"""

from __future__ import annotations

import statistics
import time

import torch

from moetx import FSDP, ActivationCheckpoint, ExpertParallel, MeshDegrees
from moetx.models import MoEConfig, MoETransformer

CASES = [
    (
        "ExpertParallel() \\| ActivationCheckpoint() \\| FSDP()",
        ExpertParallel() | ActivationCheckpoint() | FSDP(),
        MeshDegrees(dp_shard=256, ep=64),
    ),
    (
        "ExpertParallel() \\| FSDP() (HSDP 2 × 128)",
        ExpertParallel() | FSDP(),
        MeshDegrees(dp_replicate=2, dp_shard=128, ep=64),
    ),
]


def _median_seconds(fn, runs: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    config = MoEConfig.deepseek_v3_shaped()

    def build() -> torch.nn.Module:
        with torch.device("meta"):
            return MoETransformer(config)

    t_build, model = _median_seconds(build)
    n = sum(p.numel() for p in model.parameters())  # type: ignore[union-attr]
    print(
        "| step | world | pipeline | seconds (median of 3) | per-rank GiB (params + grads + AdamW) |"
    )
    print("|---|---|---|---|---|")
    print(f"| build on meta ({n / 1e9:.1f} B params) | – | – | {t_build:.2f} | – |")
    for name, pipeline, degrees in CASES:
        t_plan, plan = _median_seconds(lambda p=pipeline, d=degrees: p.plan(config, d))
        gib = plan.max_rank_bytes / 2**30  # type: ignore[attr-defined]
        print(
            f"| plan (apply on meta, fake backend) | {degrees.world_size} | `{name}` | {t_plan:.2f} | {gib:.2f} |"
        )


if __name__ == "__main__":
    main()
