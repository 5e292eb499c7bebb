"""Activation bytes and step time of each `ActivationCheckpoint` mode against no checkpointing.

One synthetic MoE transformer (6 blocks, the first dense; H=128, 4 heads / 2 KV heads, E=8,
k=2, I=256, one shared expert, vocab 512, fp32) on a batch of 4 x 128 tokens with labels.

- Activation bytes: what forward leaves resident for backward, measured on one process with
  `moetx.planning.meter.LiveActivationMeter` (weak references to every op output's storage; parameters,
  inputs and the logits excluded). Deterministic: the same on every run.
- Step time: median forward + backward over `--steps` steps after `--warmup`, one process with
  one intra-op thread; and, with `--ranks N` (default 2, 0 to skip), the same model under
  `ExpertParallel()` on N gloo ranks (ep = N; each rank runs its own 4 x 128 batch), slowest
  rank's median. The modes' steps are interleaved (one of each per round) so that load on a
  shared machine hits them alike; step times still vary run to run, the byte column does not.

Run: `python -m benchmarks.activation_memory [--steps 10] [--ranks 2]`. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from moetx.models import MoEConfig, MoETransformer
from moetx.passes.activation_checkpoint.api import MODES, ActivationCheckpoint
from moetx.planning.meter import LiveActivationMeter
from moetx.testing import fake_world
from moetx.testing.ranks import RankPool
from moetx.testing.train import TrainSpec, global_batches
from tests.bodies.activation_checkpoint import ep_step_times

CONFIG = MoEConfig(
    vocab_size=512,
    hidden_size=128,
    num_layers=6,
    num_dense_layers=1,
    num_heads=4,
    num_kv_heads=2,
    num_experts=8,
    top_k=2,
    expert_hidden_size=256,
    num_shared_experts=1,
    dense_hidden_size=512,
)
SPEC = TrainSpec(config=CONFIG, rows_per_rank=4, seq_len=128, steps=1)


def _model(mode: str | None) -> torch.nn.Module:
    model = MoETransformer(CONFIG)
    if mode is None:
        return model
    from moetx.mesh.parallel_mesh import ParallelMesh

    with fake_world(1):  # the pass takes a mesh; checkpointing itself never communicates
        return ActivationCheckpoint(mode=mode).apply(model, ParallelMesh.build())


def activation_bytes(mode: str | None) -> int:
    """Bytes of op outputs forward leaves alive (the logits excluded)."""
    model = _model(mode)
    ids, labels = global_batches(SPEC, 1)[0]
    with LiveActivationMeter(exclude=[model, ids, labels]) as live:
        out = model(ids, labels=labels)
    return live.live_bytes(exclude=[out.logits, out.loss])


def step_times(modes: list[str | None], *, warmup: int, steps: int) -> dict[str | None, float]:
    """Median seconds of one forward + backward per mode on one process, modes interleaved."""
    models = {m: _model(m) for m in modes}
    ids, labels = global_batches(SPEC, 1)[0]
    times: dict[str | None, list[float]] = {m: [] for m in modes}
    for i in range(warmup + steps):
        for mode, model in models.items():
            begin = time.perf_counter()
            model(ids, labels=labels).loss.backward()
            if i >= warmup:
                times[mode].append(time.perf_counter() - begin)
    return {m: sorted(t)[len(t) // 2] for m, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2, help="EP ranks for the timing (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    modes: list[str | None] = [None, *MODES]
    memory = {m: activation_bytes(m) for m in modes}
    local = step_times(modes, warmup=args.warmup, steps=args.steps)
    ep: dict[str | None, float] = {}
    if args.ranks:
        with RankPool(args.ranks, timeout=600) as pool:
            per_rank = pool.run(
                ep_step_times, SPEC, tuple(modes), warmup=args.warmup, steps=args.steps
            )
        ep = {m: max(r[m] for r in per_rank) for m in modes}
    ep_head = f" | EP {args.ranks} ranks step ms | EP step ratio" if ep else ""
    print(
        "| mode | activation KiB | activation ratio | 1-proc step ms | 1-proc step ratio"
        + ep_head
        + " |"
    )
    print("|---" * (5 + 2 * bool(ep)) + "|")
    for m in modes:
        row = (
            f"| {m or 'none'} | {memory[m] / 1024:.0f} | {memory[m] / memory[None]:.3f} | "
            f"{1e3 * local[m]:.1f} | {local[m] / local[None]:.2f}"
        )
        if ep:
            row += f" | {1e3 * ep[m]:.1f} | {ep[m] / ep[None]:.2f}"
        print(row + " |")


if __name__ == "__main__":
    main()
