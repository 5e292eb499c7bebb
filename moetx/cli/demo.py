"""`moetx demo`: train a synthetic MoE on local CPU ranks next to a single-process reference.

It shows the three things moetx promises: a pipeline is a readable value, a wrong order is a
teaching error before any work is done, and a parallelized model trains like one process
(same losses and gradients, to fp32 tolerance).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from moetx.cli.args import check_ranges, parse_pipeline
from moetx.core.algebra import Pipeline
from moetx.core.errors import CommandLineError, MoetxError
from moetx.mesh import MeshDegrees
from moetx.models import MoEConfig
from moetx.testing.ranks import RankPool
from moetx.testing.train import (
    TrainSpec,
    build_model,
    rank_session_end,
    rank_session_start,
    rank_session_step,
    rank_train,
    reference,
)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def report(results: list[dict[str, Any]], ref: dict[str, Any], steps: int) -> tuple[str, float]:
    """Side-by-side table of reference vs parallel losses and gradient differences."""
    rows = [["step", "reference loss", "moetx loss", "max |Δ grad|", "step time (s)"]]
    worst = 0.0
    for s in range(steps):
        got = float(torch.stack([r["losses"][s] for r in results]).mean())
        diff = max(_max_abs_diff(ref["grads"][s], r["grads"][s]) for r in results)
        worst = max(worst, diff, abs(got - float(ref["losses"][s])))
        t = max(r["step_times"][s] for r in results)
        rows.append(
            [str(s + 1), f"{float(ref['losses'][s]):.6f}", f"{got:.6f}", f"{diff:.1e}", f"{t:.3f}"]
        )
    pdiff = max(_max_abs_diff(ref["params"], r["params"]) for r in results)
    worst = max(worst, pdiff)
    mem = [["rank", "param bytes", "grad bytes"]] + [
        [str(i), f"{r['param_bytes']:,}", f"{r['grad_bytes']:,}"] for i, r in enumerate(results)
    ]
    text = (
        _table(rows) + f"\nparameters after {steps} steps: max |Δ| = {pdiff:.1e}\n\n" + _table(mem)
    )
    return text, worst


def main(argv: list[str] | None = None) -> int:
    """Entry point of `moetx demo`; returns the process exit code."""
    ap = argparse.ArgumentParser(prog="moetx demo", description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="local CPU ranks to spawn (default 2)")
    ap.add_argument(
        "--pipeline", default="ep|ac|fsdp", help="passes joined by '|' (default ep|ac|fsdp)"
    )
    ap.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: ranks)")
    ap.add_argument("--cp", type=int, default=1, help="context-parallel degree")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    ap.add_argument("--dp-replicate", type=int, default=1, help="HSDP replicas")
    ap.add_argument("--dispatcher", default="all_to_all", choices=("all_to_all", "all_gather"))
    ap.add_argument("--ac-mode", default="router", choices=("full", "router", "selective"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    args = ap.parse_args(argv)
    try:
        positive = ("ranks", "ep", "cp", "dp_replicate", "steps", "layers", "experts")
        check_ranges("moetx demo", args, dict.fromkeys(positive, 1))
    except CommandLineError as e:
        print(f"moetx demo: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    ranks = int(os.environ["WORLD_SIZE"]) if torchrun else args.ranks
    ep = (
        args.ep
        if args.ep is not None
        else (ranks // (args.dp_replicate * args.tp) if "ep" in args.pipeline else 1)
    )
    say = print if not torchrun or os.environ["RANK"] == "0" else (lambda *a, **k: None)
    try:
        pipeline = parse_pipeline(args.pipeline, dispatcher=args.dispatcher, ac_mode=args.ac_mode)
        degrees = MeshDegrees.resolve(
            ranks, dp_replicate=args.dp_replicate, cp=args.cp, ep=ep, tp=args.tp
        )
        config = MoEConfig(
            num_layers=args.layers,
            num_experts=args.experts,
            hidden_size=16,
            num_shared_experts=1,
            num_heads=4,
            num_kv_heads=2,  # heads split over --tp 2
        )
    except (MoetxError, ValueError) as e:
        print(f"moetx demo: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    spec = TrainSpec(config=config, steps=args.steps)
    nparams = sum(p.numel() for p in build_model(spec).parameters())
    say(f"model:    {config!r}\n          ({nparams:,} parameters)")
    say(f"pipeline: {pipeline!r}")
    say(f"mesh:     {degrees!r} on {ranks} {'torchrun' if torchrun else 'local CPU'} ranks\n")
    say("A wrong order fails where the pipeline is written, before any model exists:")
    say("  >>> FSDP() | ExpertParallel()")
    try:
        parse_pipeline("fsdp|ep")
    except MoetxError as e:
        say("  " + f"{type(e).__name__}: {e}".replace("\n", "\n  ") + "\n")

    say(f"Training {args.steps} AdamW steps on {ranks} ranks, each on its own rows of the batch,")
    say("against one process training on the whole (global) batch ...")
    start = time.perf_counter()
    try:
        if torchrun:
            results = _run_torchrun(spec, pipeline, degrees)
            if results is None:
                return 0
        else:
            results = _run_local(spec, pipeline, degrees, say)
    except MoetxError as e:
        print(f"moetx demo: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    ref = reference(spec, degrees.dp_replicate * degrees.dp_shard)
    say("")
    text, worst = report(results, ref, args.steps)
    say(text)
    ok = worst <= 1e-4
    say(
        f"\n{'PARITY OK' if ok else 'PARITY FAILED'}: largest difference {worst:.1e} (fp32 tolerance 1e-4); "
        f"wall time {time.perf_counter() - start:.1f} s"
    )
    return 0 if ok else 1


def _run_local(
    spec: Any, pipeline: Pipeline, degrees: MeshDegrees, say: Any
) -> list[dict[str, Any]]:
    """Spawn local CPU ranks and train step by step, printing progress after each step."""
    with RankPool(degrees.world_size, timeout=300) as pool:
        param_bytes = pool.run(rank_session_start, spec, pipeline, degrees)
        steps: list[list[dict[str, Any]]] = []
        for i in range(spec.steps):
            got = pool.run(rank_session_step, i)
            steps.append(got)
            say(f"  step {i + 1}/{spec.steps} done in {max(r['step_time'] for r in got):.2f} s")
        params = pool.run(rank_session_end)
    return [
        {
            "losses": [s[r]["loss"] for s in steps],
            "grads": [s[r]["grads"] for s in steps],
            "step_times": [s[r]["step_time"] for s in steps],
            "grad_bytes": steps[-1][r]["grad_bytes"],
            "param_bytes": param_bytes[r],
            "params": params[r],
        }
        for r in range(degrees.world_size)
    ]


def _run_torchrun(
    spec: Any, pipeline: Pipeline, degrees: MeshDegrees
) -> list[dict[str, Any]] | None:
    """Under torchrun: run this rank's part, gather results on rank 0 (None elsewhere).

    With CUDA, NCCL and one GPU per rank (`LOCAL_RANK`): the model and its batches move there
    (`moetx.testing.train` follows the backend); results come back as CPU copies.
    """
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if device is None else "nccl", device_id=device)
    try:
        mine = rank_train(spec, pipeline, degrees)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return gathered if dist.get_rank() == 0 else None
    finally:
        dist.destroy_process_group()
