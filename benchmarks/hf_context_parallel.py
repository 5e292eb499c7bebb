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

from benchmarks.context_parallel import cp_table
from moetx.testing import hf, ranks
from tests.bodies.hf_bench import HFBenchCase, bench_hf_step


def main() -> None:
    """The HF Qwen3-MoE table."""
    ranks.PRELOAD = (*ranks.PRELOAD, *hf.PRELOAD)  # import transformers once, in the forkserver
    cp_table(HFBenchCase, bench_hf_step)


if __name__ == "__main__":
    main()
