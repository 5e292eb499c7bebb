"""Compile: compile time and steady step time of the README pipelines, compiled vs eager.

The step-anatomy workload (Qwen3-MoE shape: hidden 64, 4 layers, 8 experts top-2, seq 64,
global batch 8 rows, AdamW, fp32) on 2 gloo ranks, one thread each, for each README pipeline
with and without `Compile(backend=...)` (inductor by default: C++ kernels on CPU). Per row: the
first step of each (forward + backward + AdamW; the compiled one holds the compilation), the
median of the steady steps after it (eager and compiled steps interleaved in one run, so CPU
sharing weighs on both), their ratio, and the graphs / graph breaks per block the compiled
model reported. Inductor's on-disk caches start empty (a cold compile). Times are the slowest
rank's; compare ratios within one run.

Run: `python -m benchmarks.compile [--steps 6] [--backend inductor] [--ranks 2]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from moetx import Compile, MeshDegrees, Pipeline
from moetx.models import MoEConfig
from moetx.testing.ranks import RankPool
from moetx.testing.train import TrainSpec
from tests.bodies.compile import compile_bench

CONFIG = MoEConfig(
    vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
    num_experts=8, top_k=2, expert_hidden_size=64, num_shared_experts=0,
)  # fmt: skip
SEQ = 64
GLOBAL_ROWS = 8
#: (pipeline text with `{c}` where Compile goes, mesh) on 2 ranks
CASES: list[tuple[str, MeshDegrees]] = [
    ("ep|{c}fsdp", MeshDegrees(dp_shard=2, ep=2)),
    ("ep|ac|{c}fsdp", MeshDegrees(dp_shard=2, ep=2)),
    ("cp|ep|ac|{c}fsdp", MeshDegrees(dp_shard=1, cp=2, ep=2)),
]


def _graphs(graphs: dict[str, tuple[int, int]]) -> str:
    counts = sorted({g for g in graphs.values()})
    return ", ".join(f"{g} graphs / {b} breaks" for g, b in counts)


def main() -> None:
    """Print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    # A cold compile: inductor's on-disk caches (FX graphs, kernels) start empty in every run.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="moetx-bench-inductor-")
    print(
        "| pipeline | mesh | first step eager s | first step compiled s | steady eager ms | "
        "steady compiled ms | compiled / eager | graphs / breaks per block |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with RankPool(args.ranks, timeout=1800) as pool:
        for text, degrees in CASES:
            data = degrees.dp_replicate * degrees.dp_shard
            spec = TrainSpec(
                config=CONFIG, steps=args.steps, rows_per_rank=GLOBAL_ROWS // data, seq_len=SEQ
            )
            eager = Pipeline.parse(text.format(c=""))
            compiled = Pipeline.parse(text.format(c=f"compile(backend={args.backend!r})|"))
            assert any(isinstance(p, Compile) for p in compiled)
            started = time.perf_counter()
            res = pool.run(compile_bench, spec, eager, compiled, degrees)
            wall = time.perf_counter() - started
            slowest = {k: max(r[k] for r in res) for k in ("first_eager", "first_compiled")}
            steady = {k: max(r[k] for r in res) for k in ("eager", "compiled")}
            mesh = " ".join(
                f"{a}={getattr(degrees, a)}"
                for a in ("dp_shard", "cp", "ep")
                if getattr(degrees, a) > 1
            )
            print(
                f"| `{str(compiled).replace('|', chr(92) + '|')}` | {mesh} | "
                f"{slowest['first_eager']:.2f} | {slowest['first_compiled']:.1f} | "
                f"{1e3 * steady['eager']:.1f} | {1e3 * steady['compiled']:.1f} | "
                f"{steady['compiled'] / steady['eager']:.2f} | {_graphs(res[0]['graphs'])} |",
                flush=True,
            )
            del wall


if __name__ == "__main__":
    main()
