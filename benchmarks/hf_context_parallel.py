"""Per-rank saved activation bytes and step time of an HF Qwen3-MoE, cp=1 against cp=2.

The tiny Hugging Face Qwen3-MoE of `moetx.testing.hf` (2 layers, 4 experts, top-2, vocab 32),
widened to hidden 64, 4 query heads, 2 KV heads, head_dim 16, runs one training step (forward +
backward of HF's own causal-LM loss, batch 1, fp32) on 2 gloo ranks, one intra-op thread each.
cp=1: each rank runs the whole sequence alone (HF's SDPA attention). cp=2: `ContextParallel(comm)`
splits it (load-balanced), with the README's batch recipe (labels shifted over the whole sequence,
then sharded; `shift_labels=`). "Saved" is the bytes of the unique storages autograd saves for
backward (a `saved_tensors_hooks` meter; parameters excluded), on the rank that saves most; "step"
is the median forward + backward time of the slowest rank, ranks started together after a barrier.

Run: `python -m benchmarks.hf_context_parallel [--seq 1024 2048 4096] [--steps 5]`. Prints a
markdown table. Timings on a shared 2-core machine are noisy; bytes are deterministic.
"""

from __future__ import annotations

import argparse

from moetx.testing import hf, ranks
from moetx.testing.ranks import RankPool
from tests.bodies.hf_bench import HFBenchCase, bench_hf_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    ranks.PRELOAD = (*ranks.PRELOAD, *hf.PRELOAD)  # import transformers once, in the forkserver
    print(
        "| seq len | cp | comm | saved MiB / rank | saved vs cp=1 | step ms (slowest rank) | "
        "step vs cp=1 |"
    )
    print("|---|---|---|---|---|---|---|")
    with RankPool(2, timeout=600) as pool:
        for seq in args.seq:
            base: tuple[float, float] | None = None
            for cp, comm in ((1, "-"), (2, "allgather"), (2, "p2p")):
                case = HFBenchCase(seq_len=seq, cp=cp, comm=comm)
                results = pool.run(bench_hf_step, case, warmup=args.warmup, steps=args.steps)
                saved = max(r["saved_bytes"] for r in results) / 2**20
                step = 1e3 * max(r["time"] for r in results)
                base = base or (saved, step)
                print(
                    f"| {seq} | {cp} | `{comm}` | {saved:.1f} | {saved / base[0]:.2f} | "
                    f"{step:.1f} | {step / base[1]:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
