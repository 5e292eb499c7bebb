"""Wall and CPU time of `moetx.autoplan` for the DeepSeek-V3-shaped model at world 256 and 1024.

Every legal mesh (dp_replicate × dp_shard × cp, ep dividing dp_shard × cp and the 256 experts)
and pipeline (cp and ep when their degree is above 1, ep with the all-to-all dispatcher and, at
ep 2 and 4 (below top_k 8), the all-gather one; no checkpointing, router, selective, full
and full on every 2nd block; FSDP with reshard_after_forward "auto" or True, or none) is
enumerated, pruned by parameter-state bytes, and the rest predicted (activations from meta
traces, with the EP pass applied, cached per cp degree, tp degree, dispatcher and its trace
degree, and checkpointing mode).
80 GiB per rank, sequences of 4096 tokens, one per data rank. Context parallelism refuses the
model's MTP head, so its candidates are counted but left out.

Run: `python -m benchmarks.autoplan_time`. Prints a markdown table (median of 3 runs each),
for the default passes and again with tensor parallelism allowed (tp 2, 4, 8: opt-in).
"""

from __future__ import annotations

import statistics
import time

from moetx import autoplan
from moetx.models import MoEConfig
from moetx.planning.autoplan import DEFAULT_PASSES, PASSES

WORLDS = (256, 1024)


def main() -> None:
    config = MoEConfig.deepseek_v3_shaped()
    print(
        "| world | passes | candidates | pruned by state | fit 80 GiB | wall s (median of 3) "
        "| CPU s | best | its memory GiB | its bytes/token |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for passes in (DEFAULT_PASSES, PASSES):
        for world in WORLDS:
            walls, cpus, result = [], [], None
            for _ in range(3):
                wall, cpu = time.perf_counter(), time.process_time()
                result = autoplan(
                    config, world=world, memory_per_rank=80 * 2**30, seq=4096,
                    passes_allowed=passes,
                )  # fmt: skip
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            assert result is not None
            best = result.best
            d = best.degrees
            pipe = repr(best.pipeline).replace("|", "\\|")  # a `|` would end the table cell
            where = f"dp_replicate={d.dp_replicate} dp_shard={d.dp_shard} cp={d.cp} ep={d.ep}"
            where += f" tp={d.tp}" if d.tp > 1 else ""
            print(
                f"| {world} | {','.join(passes)} | {result.considered} | {result.pruned} "
                f"| {len(result.fits)} | {statistics.median(walls):.1f} "
                f"| {statistics.median(cpus):.1f} | `{pipe}` on {where} "
                f"| {best.prediction.memory / 2**30:.1f} | {best.prediction.bytes_per_token:,.0f} |"
            )


if __name__ == "__main__":
    main()
