"""Per-rank parameter, gradient and AdamW bytes vs the ideal, and moetx vs hand-written step time.

For a fixed synthetic MoE (H=64, 4 layers, 8 experts of hidden 64, 1 shared, vocab 256) on CPU
gloo ranks: each rank's local bytes of parameters, gradients (after backward) and AdamW state,
divided by the ideal (total / FSDP shard degree; = world size without HSDP replicas); and the median step time (fwd + bwd + AdamW, 7 steps
after 2 warm-up steps, the two models' steps interleaved in the same run) of moetx's pipeline
against the same parallelization written by hand with `fully_shard` calls.

Run: `python -m benchmarks.memory`. Prints a markdown table.
"""

from __future__ import annotations

from moetx import FSDP, ExpertParallel, MeshDegrees, Pipeline
from moetx.models import MoEConfig
from moetx.testing.ranks import RankPool
from moetx.testing.train import TrainSpec
from tests.bodies.bench import compare_step_time

CONFIG = MoEConfig(
    vocab_size=256,
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    num_experts=8,
    top_k=2,
    expert_hidden_size=64,
    num_shared_experts=1,
)
CASES = [
    (2, "FSDP()", Pipeline([FSDP()]), MeshDegrees(dp_shard=2), False),
    (
        2,
        "ExpertParallel() | FSDP()",
        ExpertParallel() | FSDP(),
        MeshDegrees(dp_shard=2, ep=2),
        True,
    ),
    (4, "FSDP()", Pipeline([FSDP()]), MeshDegrees(dp_shard=4), False),
    (
        4,
        "ExpertParallel() | FSDP()",
        ExpertParallel() | FSDP(),
        MeshDegrees(dp_shard=4, ep=2),
        True,
    ),
    (
        4,
        "ExpertParallel() | FSDP()",
        ExpertParallel() | FSDP(),
        MeshDegrees(dp_shard=4, ep=4),
        True,
    ),
    (4, "HSDP FSDP()", Pipeline([FSDP()]), MeshDegrees(dp_replicate=2, dp_shard=2), False),
]


def main() -> None:
    spec = TrainSpec(config=CONFIG, rows_per_rank=2, seq_len=32)
    print(
        "| ranks | pipeline | mesh | params / ideal | grads / ideal | AdamW / ideal | "
        "step ms moetx | step ms hand | moetx / hand |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for world in (2, 4):
        with RankPool(world, timeout=600) as pool:
            for w, name, pipe, degrees, ep in CASES:
                if w != world:
                    continue
                res = pool.run(compare_step_time, spec, pipe, degrees, ep=ep)
                # ideal: everything sharded over the FSDP shard group (HSDP replicas hold copies)
                ideal = res[0]["total_param_bytes"] / (degrees.dp_shard * degrees.cp)
                worst = {k: max(r[k] for r in res) / ideal for k in res[0] if k.endswith("_bytes")}
                t_moetx = max(r["moetx_median_s"] for r in res) * 1e3
                t_hand = max(r["hand_median_s"] for r in res) * 1e3
                mesh = f"dp_rep={degrees.dp_replicate} dp_shard={degrees.dp_shard} ep={degrees.ep}"
                print(
                    f"| {world} | `{name.replace('|', chr(92) + '|')}` | {mesh} | {worst['moetx_param_bytes']:.3f} | "
                    f"{worst['moetx_grad_bytes']:.3f} | {worst['moetx_adam_bytes'] / 2:.3f} | "
                    f"{t_moetx:.1f} | {t_hand:.1f} | {t_moetx / t_hand:.2f} |"
                )


if __name__ == "__main__":
    main()
