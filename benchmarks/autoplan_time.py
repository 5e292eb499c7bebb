"""Wall and CPU time of `moetx.autoplan` for the DeepSeek-V3-shaped model at world 256 and 1024.

Every legal mesh (dp_replicate × dp_shard × cp, ep dividing dp_shard × cp and the 256 experts)
and pipeline (cp and ep when their degree is above 1, ep with the all-to-all dispatcher and, at
ep 2 and 4 (below top_k 8), the all-gather one; no checkpointing, router, selective, full
and full on every 2nd block; FSDP with reshard_after_forward "auto" or True, or none) is
enumerated, pruned by parameter-state bytes, and the rest predicted (activations from meta
traces, with the EP pass applied, cached per cp degree, dispatcher and its trace degree, and
checkpointing mode; a tp trace composed from the tp = 1 one and a cheap all-to-all trace at
that tp degree: `moetx.planning.trace_cache`).
80 GiB per rank, sequences of 4096 tokens, one per data rank. Context parallelism refuses the
model's MTP head (and sequence parallelism this model), so their candidates are counted but
left out.

Run: `python -m benchmarks.autoplan_time`. Prints a markdown table (median of 3 runs each),
for the default passes and again with tensor parallelism allowed (tp 2, 4, 8: opt-in).

Measured on the shared 2-core box (other helpers' tests running; `uptime` load given), wall /
CPU seconds (`time.process_time`), world 256 / 1024:

| | default passes | tp allowed | traces run at 1024 with tp |
|---|---|---|---|
| before (af2da8e; 1 run each, load 2-3.7) | 6.6 / 11.1 wall, 7.7 / 11.9 CPU | 61.5 / 81.1 wall, 46.7 / 60.2 CPU | 64 + 180 refused |
| after (this script, load 5.8 -> 4.7) | 8.1 / 8.1 wall, 6.1 / 6.1 CPU | 34.8 / 14.8 wall, 12.1 / 14.1 CPU | 28 + 180 refused |

(The 34.8 s wall at world 256 is a load spike: 12.1 s CPU. The previous session measured 20.8
/ 31.1 s wall with tp at load ~7; traces then varied 3-8x with load, see below.) What changed:
tp traces are composed, not run (36 of the 64 at world 1024, those with 64-256 local experts);
a trace runs
torch's CPU ops on one thread (`meta_env.meta_world`: the routing twins' 32k-id sorts waited
20-80 ms for OpenMP threads on the loaded box, 0.5 ms on one); one `Pipeline` per distinct pass
tuple. Left at world 1024 with tp (cProfile): the 16 tp = 1 traces ~5 s CPU, the 12 cheap tp
traces ~2.7 s, 180 refused keys ~2.8 s (each built its fake mesh, up to 1,024 ranks: ~3,900
`new_group` calls), per-candidate `predict` / `state_bytes` ~3 s. The refused keys are now
decided by the passes' checks on the mesh degrees, no fake world (`moetx.planning.refusal`):
0.17 s CPU for the 180 at world 1024 with tp (3.7 s before, without cProfile), 0.01 s for the
24 without tp (0.4 s); see benchmarks/README.md for the times.

Predictions unchanged: autoplan with tp at world 256 and 1024, with the composition and with it
turned off (every key traced whole), gives equal fits, misses (every prediction), order,
counts and refusals (1,170 / 2,370 predicted candidates). Against af2da8e the all-gather
dispatcher's candidates hold 472 B less (8 B x 59 MoE blocks): a stale CPU twin (its count
tensor) was counted, depending on id reuse; fixed in `meta_values`.
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
