"""Run every benchmark in benchmarks/ and write their tables to benchmarks/README.md.

Each benchmark is a script that prints a markdown table. This runner records the machine, the
date and the torch version with them, because CPU timings on a shared 2-core box are only
comparable within one run (ratios), never across runs. Bytes are deterministic.

Run: `make bench` (or `python -m benchmarks.run_all [--only NAME ...]`; with `--only`, the other
sections of benchmarks/README.md are kept as they were).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

#: (script, arguments, section title, what it shows)
BENCHMARKS: list[tuple[str, list[str], str, str]] = [
    (
        "memory.py",
        [],
        "FSDP: per-rank memory vs ideal, moetx vs hand-written step time",
        "Bytes each rank holds divided by the ideal; median step time (7 steps after 2 warm-up, "
        "interleaved in one run) of the moetx pipeline and of the same parallelization written "
        "with `fully_shard` calls.",
    ),
    (
        "ep_dispatch.py",
        [],
        "Expert parallel: bytes moved per dispatcher",
        "Bytes each rank sends per step (fwd+bwd) for the two token dispatchers, against the "
        "minimum that must leave the rank.",
    ),
    (
        "dedup.py",
        ["--steps", "21"],
        "Expert parallel: token dedup per destination rank",
        "Issue 17 item 3, the step-anatomy workload shape (hidden 64, 8 experts, fp32; EP only): "
        "bytes the EP all-to-alls send per rank per step with `ExpertParallel(dedup=True)` off and "
        "on, against the minimum (distinct remote (token, rank) pairs x hidden x 4 bytes, once per "
        "all-to-all: dispatch and combine, forward and backward), the collectives per step, and "
        "the step-time ratio on / off (forward + backward, wall and process CPU, slowest rank, "
        "median of interleaved per-step ratios).",
    ),
    (
        "activation_memory.py",
        [],
        "Activation checkpointing: resident activation bytes per mode",
        "Activation bytes left resident by forward (deterministic meter) and step-time ratio vs no "
        "checkpointing.",
    ),
    (
        "context_parallel.py",
        ["--seq", "1024", "2048", "4096", "--steps", "7"],
        "Context parallel: attention activation bytes and step time",
        "Per-rank saved attention bytes and step time, cp=1 vs cp=2, both comm modes.",
    ),
    (
        "tensor_parallel.py",
        [],
        "Tensor parallelism: bytes, step time and collectives",
        "Per-rank parameter and gradient bytes, median step time and collectives per step of "
        "TP | EP | FSDP (with and without sequence parallelism) against EP | FSDP on 4 ranks, "
        "same global batch.",
    ),
    (
        "hf_context_parallel.py",
        ["--seq", "1024", "2048", "4096", "--steps", "5"],
        "Context parallel on a Hugging Face Qwen3-MoE: saved activation bytes and step time",
        "Per-rank bytes saved for backward and training-step time of the unmodified HF model, "
        "cp=1 vs cp=2, both comm modes.",
    ),
    (
        "step_anatomy.py",
        [
            "--steps",
            "9",
            "--fsdp",
            "fsdp",
            "fsdp(prefetch=0)",
            "fsdp(min_unit_bytes=0, prefetch=0)",
            "fsdp(reshard_after_forward=True, min_unit_bytes=0, prefetch=0)",
            "fsdp(reshard_after_forward=True, min_unit_bytes=0)",
        ],
        "Step anatomy: step time vs compute only, collectives by kind and axis",
        "Issue 17's workload (hidden 64, 4 layers, 8 experts top-2, seq 64, global batch 8, "
        "AdamW, fp32) on 2 and 4 ranks: median step time of the slowest rank (and its ratio to the "
        "first row of its pipeline, steps interleaved; for a row that prefetches, its ratio to "
        "the same FSDP without prefetch), the same model "
        "without parallelism on each rank's share of the batch (interleaved, all ranks at once), "
        "their ratio, and one step's collectives by kind and mesh axis with their bytes. "
        "Each pipeline with FSDP's default (`FSDP()`: `reshard_after_forward='auto'`, units "
        "gathered once per step when they fit; `min_unit_bytes=1 << 20`, small embedding and lm "
        "head in the root unit, consecutive small blocks in one unit; `prefetch=1`, each unit "
        "starting the next one's all-gather), the same without prefetch, the default before "
        "(one unit per block: `min_unit_bytes=0`, no prefetch), FSDP as before issue 17 "
        "(`reshard_after_forward=True`, every unit all-gathered twice per step), and that with "
        "prefetch.",
    ),
    (
        "overlap.py",
        ["--reps", "200"],
        "Overlap: expert dispatch all-to-all behind the shared expert",
        "Issue 17 item 4, one MoE layer's forward on 2 ranks (256 tokens per rank, top-2, fp32): "
        "the dispatch `all_to_all_single` alone, the shared expert (`DenseMLP`, intermediate = "
        "hidden) alone, both in series (moetx's order) and overlapped (issue, compute, wait); "
        "medians of the slowest rank over interleaved repetitions, with interquartile ranges. "
        "`overlapped / serial` below 1 means overlap helps; `best possible` is "
        "max(a2a, shared) / serial.",
    ),
    (
        "compile.py",
        ["--steps", "6"],
        "Compile: compile time and step time, compiled vs eager",
        "The step-anatomy workload on 2 ranks, each README pipeline with and without "
        "`Compile()` (inductor, C++ kernels on the CPU): the first step of each (the compiled one "
        "holds the compilation), the median of the 5 steady steps after it (eager and compiled "
        "steps interleaved), their ratio, and the graphs / graph breaks per block the compiled "
        "model reported (slowest rank).",
    ),
    (
        "checkpoint_integrity.py",
        [],
        "Checkpoints: the cost of integrity hashes",
        "Save and load time with and without SHA-256 records (one process, files in the page "
        "cache, median of 5).",
    ),
    (
        "plan_time.py",
        [],
        "Plan / apply time on the DeepSeek-V3-shaped meta model",
        "Time to build the DeepSeek-V3-shaped model on `meta` and plan it at world size 256 on the "
        "fake backend.",
    ),
    (
        "autoplan_time.py",
        [],
        "Auto-planner time on the DeepSeek-V3-shaped model",
        "Wall and CPU time of `moetx.autoplan` (80 GiB per rank, seq 4096) at world 256 and 1024: "
        "enumerate meshes and pipelines, prune by state bytes, predict the rest.",
    ),
]


def _sections(readme: Path) -> dict[str, str]:
    """Title -> section text (from its `## ` line) of an existing README, for `--only` runs."""
    if not readme.exists():
        return {}
    parts = readme.read_text().split("\n## ")[1:]
    return {p.split("\n", 1)[0]: f"## {p.rstrip()}\n" for p in parts}


def main() -> int:
    """Run the benchmarks and rewrite benchmarks/README.md; returns an exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="script names to run (default: all)")
    args = ap.parse_args()
    sections = []
    failed = 0
    kept = _sections(HERE / "README.md") if args.only else {}
    for script, extra, title, what in BENCHMARKS:
        if args.only and script not in args.only:
            if title in kept:
                sections.append(kept[title])
            continue
        if not (HERE / script).exists():
            sections.append(f"## {title}\n\n_`{script}` is not present in this checkout._\n")
            continue
        print(f"running {script} ...", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{script.removesuffix('.py')}", *extra],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            check=False,
        )
        took = time.perf_counter() - start
        table = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("|"))
        if proc.returncode or not table:
            failed += 1
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            body = f"**failed** (exit {proc.returncode}):\n\n```text\n{tail}\n```"
        else:
            body = table
        cmd = shlex.join(["python", "-m", f"benchmarks.{script.removesuffix('.py')}", *extra])
        sections.append(f"## {title}\n\n{what}\n\n`{cmd}` ({took:.0f} s)\n\n{body}\n")
    header = (
        "# moetx benchmarks\n\n"
        "Written by `make bench` (`python -m benchmarks.run_all`); do not edit by hand.\n\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}\n"
        f"- torch: {torch.__version__} (gloo ranks on the CPU)\n\n"
        "Timings on a small shared CPU box are noisy: compare ratios within one table only. "
        "Byte counts are deterministic.\n\n"
    )
    (HERE / "README.md").write_text(header + "\n".join(sections))
    print(f"wrote {HERE / 'README.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
