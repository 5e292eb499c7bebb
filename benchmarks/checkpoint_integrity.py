"""Cost of checkpoint integrity: `save_checkpoint`/`load_checkpoint` with and without the hashes.

`save_checkpoint(integrity=True)` (the default) hashes every file a rank wrote (SHA-256) and
`load_checkpoint(verify=True)` (the default) hashes every file a rank reads before reading it.
One process, no process group, model only, files in the page cache (a temporary directory), so
the numbers are the CPU cost of hashing, not disk speed.

Run: `python -m benchmarks.checkpoint_integrity` (from the repository root). Prints a markdown table (median of 5 runs).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

from moetx import load_checkpoint, save_checkpoint
from moetx.models import MoEConfig, MoETransformer

MODELS = {
    "tiny (tests)": MoEConfig(num_experts=4, num_layers=2, num_dense_layers=1),
    "larger": MoEConfig(
        vocab_size=16000,
        hidden_size=1024,
        num_layers=2,
        num_dense_layers=0,
        num_heads=8,
        num_kv_heads=8,
        num_experts=8,
        expert_hidden_size=1024,
    ),
}


def _median_ms(fn: Callable[[], object], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
    print(
        "| model | checkpoint MiB | save ms (no hashes) | save ms (hashes) "
        "| load ms (no verify) | load ms (verify) |"
    )
    print("|---|---|---|---|---|---|")
    for name, config in MODELS.items():
        print(_row(name, MoETransformer(config)))


def _row(name: str, model: torch.nn.Module) -> str:
    with tempfile.TemporaryDirectory() as plain, tempfile.TemporaryDirectory() as hashed:
        save_plain = _median_ms(lambda: save_checkpoint(plain, model, integrity=False))
        save_hashed = _median_ms(lambda: save_checkpoint(hashed, model))
        load_plain = _median_ms(lambda: load_checkpoint(hashed, model, verify=False))
        load_verified = _median_ms(lambda: load_checkpoint(hashed, model))
        size = sum(os.path.getsize(os.path.join(hashed, f)) for f in os.listdir(hashed))
    return (
        f"| {name} | {size / 2**20:.1f} | {save_plain:.1f} | {save_hashed:.1f} "
        f"| {load_plain:.1f} | {load_verified:.1f} |"
    )


if __name__ == "__main__":
    main()
