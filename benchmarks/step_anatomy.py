"""Step anatomy: step time against compute only, and every collective of one step by kind and axis.

The workload of issue 17 (Qwen3-MoE shape: hidden 64, 4 layers, 8 experts top-2, no shared
expert, seq 64, global batch 8 rows, AdamW, fp32) on 2 and 4 gloo ranks, one thread each, for
the README's pipelines. Per row: the median step time (fwd + bwd + AdamW, after 2 warm-up steps)
of the slowest rank, and its ratio to the first `--fsdp` variant's (their steps interleaved in
one run); for a variant with `prefetch=n`, its ratio to the same variant with `prefetch=0`
when that ran too (explicit all-gather prefetch on / off, interleaved); compute only, the same model without parallelism (activation checkpointing
kept) on each rank's share of the batch, its steps interleaved with the real ones and run on every
rank at once (so CPU sharing weighs on both); their ratio (what communication and waiting cost);
the collectives of one step on rank 0 by kind and mesh axis (`int64`: the dispatcher's token
counts), and their bytes (each collective's largest buffer: gathered parameters, unreduced
gradients, tokens sent), averaged over ranks. Collective counts and bytes are deterministic;
times are not (compare ratios within one run).

Run: `python -m benchmarks.step_anatomy [--steps 5] [--ranks 2 4] [--fsdp fsdp ...]
[--ep ep ...] [--pipelines ep ...] [--backend nccl]`; each `--fsdp` text (a `Pipeline.parse`
step, e.g. `"fsdp(reshard_after_forward=True)"`) gives one row per pipeline and mesh, for each
`--ep` text (e.g. `"ep(dispatcher='all_gather')"`), all their steps interleaved; `--pipelines`
keeps only the named pipelines (text before fsdp, as in `CASES`). `--backend nccl` runs the
ranks on one GPU each (`make gpu-check`), with times that wait for the GPU.
"""

from __future__ import annotations

import argparse
import statistics

import attrs

from moetx import MeshDegrees, Pipeline
from moetx.models import MoEConfig
from moetx.testing.ranks import BACKENDS, RankPool
from moetx.testing.train import TrainSpec
from tests.bodies.anatomy import anatomy

CONFIG = MoEConfig(
    vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
    num_experts=8, top_k=2, expert_hidden_size=64, num_shared_experts=0,
)  # fmt: skip
SEQ = 64
GLOBAL_ROWS = 8
#: (pipeline before fsdp, ranks, mesh)
CASES: list[tuple[str, int, MeshDegrees]] = [
    ("ep", 2, MeshDegrees(dp_shard=2, ep=2)),
    ("ep|ac", 2, MeshDegrees(dp_shard=2, ep=2)),
    ("cp|ep|ac", 2, MeshDegrees(dp_shard=1, cp=2, ep=2)),
    ("ep", 4, MeshDegrees(dp_shard=4, ep=2)),
    ("ep|ac", 4, MeshDegrees(dp_shard=4, ep=2)),
    ("cp|ep|ac", 4, MeshDegrees(dp_shard=2, cp=2, ep=2)),
]


def _mesh(d: MeshDegrees) -> str:
    parts = [f"{a}={getattr(d, a)}" for a in ("dp_shard", "cp", "ep") if getattr(d, a) > 1]
    return " ".join(parts)


def _step_ms(res: list[dict]) -> float:
    return 1e3 * max(r["step_s"] for r in res)


def _unprefetched(pipeline: Pipeline, pipelines: list[Pipeline]) -> int | None:
    """The index of the same pipeline with `prefetch=0`, if this one prefetches and it ran."""
    *head, fsdp = pipeline.passes
    if not getattr(fsdp, "prefetch", 0):
        return None
    plain = Pipeline([*head, attrs.evolve(fsdp, prefetch=0)])  # type: ignore[misc]
    return next((i for i, p in enumerate(pipelines) if p == plain), None)


def _row(
    name: str, degrees: MeshDegrees, res: list[dict], first: float, plain: float | None
) -> str:
    step = _step_ms(res)
    compute = 1e3 * max(r["compute_s"] for r in res)
    calls = res[0]["calls"]
    kinds = ", ".join(f"{k} {a} {n}" for (k, a), n in sorted(calls.items()))
    mib = statistics.mean(sum(r["bytes"].values()) for r in res) / 2**20
    vs_plain = f"{step / plain:.2f}" if plain else "-"
    return (
        f"| {degrees.world_size} | `{name.replace('|', chr(92) + '|')}` | {_mesh(degrees)} | "
        f"{step:.1f} | {step / (first or step):.2f} | {vs_plain} | {compute:.1f} | "
        f"{step / compute:.1f} | {sum(calls.values())} | {kinds} | {mib:.2f} |"
    )


def main() -> None:
    """Print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--fsdp", nargs="+", default=["fsdp"], help="FSDP steps to compare")
    ap.add_argument("--backend", choices=BACKENDS, default="gloo")
    heads = list(dict.fromkeys(h for h, _, _ in CASES))
    ap.add_argument(
        "--pipelines", nargs="+", choices=heads, default=heads, help="pipelines before fsdp"
    )
    ap.add_argument(
        "--ep", nargs="+", default=["ep"], help="ep steps to compare (each with every --fsdp)"
    )
    args = ap.parse_args()
    print(
        "| ranks | pipeline | mesh | step ms | step vs first row | prefetch on / off | "
        "compute ms | step / compute | collectives | by kind and axis | MiB / rank / step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for world in args.ranks:
        with RankPool(world, timeout=900, backend=args.backend) as pool:
            for head, w, degrees in CASES:
                if w != world or head not in args.pipelines:
                    continue
                pipelines = [
                    Pipeline.parse(
                        "|".join([*(ep if s == "ep" else s for s in head.split("|")), f])
                    )
                    for ep in args.ep
                    for f in args.fsdp
                ]
                rows = GLOBAL_ROWS // (degrees.dp_replicate * degrees.dp_shard)
                spec = TrainSpec(config=CONFIG, rows_per_rank=rows, seq_len=SEQ, lr=1e-3)
                res = pool.run(anatomy, spec, pipelines, degrees, steps=args.steps)
                first = 0.0
                for i, pipeline in enumerate(pipelines):
                    per_rank = [r[i] for r in res]
                    j = _unprefetched(pipeline, pipelines)
                    plain = _step_ms([r[j] for r in res]) if j is not None else None
                    print(_row(repr(pipeline), degrees, per_rank, first, plain), flush=True)
                    first = first or _step_ms(per_rank)


if __name__ == "__main__":
    main()
