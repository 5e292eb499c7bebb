"""Rank body for `benchmarks/hf_context_parallel.py`: an HF Qwen3-MoE step, cp=1 against cp=2."""

from __future__ import annotations

import time
from typing import Any, cast

import attrs
import torch
import torch.distributed as dist

from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.passes.context_parallel.api import ContextParallel
from moetx.testing.hf import HFSpec, build_model
from moetx.testing.train import mesh_for
from tests.bodies.context_parallel import _saved_bytes
from tests.bodies.hf_context_parallel import IGNORE, shift_labels

__all__ = ["HFBenchCase", "bench_hf_step"]


@attrs.frozen(kw_only=True)
class HFBenchCase:
    """One training step of the tiny HF Qwen3-MoE (a little wider), batch 1, fp32."""

    seq_len: int
    cp: int
    comm: str
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16

    def spec(self) -> HFSpec:
        """The model: `moetx.testing.hf`'s tiny Qwen3-MoE with these widths."""
        return HFSpec(
            family="qwen3_moe",
            seq_len=self.seq_len,
            overrides=(
                ("hidden_size", self.hidden_size),
                ("num_attention_heads", self.num_heads),
                ("num_key_value_heads", self.num_kv_heads),
                ("head_dim", self.head_dim),
                ("max_position_embeddings", self.seq_len),
            ),
        )


def bench_hf_step(case: HFBenchCase, *, warmup: int, steps: int) -> dict[str, Any]:
    """Saved-for-backward bytes (parameters excluded) and median forward + backward time.

    With `case.cp == 1` every rank runs the whole sequence alone (the baseline, HF's SDPA);
    otherwise the ranks split it with `ContextParallel(comm=case.comm)` and the README's recipe
    (labels shifted over the whole sequence, then sharded; world == cp).
    """
    spec = case.spec()
    model = build_model(spec)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, int(spec.config().vocab_size), (1, case.seq_len), generator=g)
    shifted = shift_labels(ids)
    positions = torch.arange(case.seq_len).expand(1, -1)
    n = (shifted != IGNORE).sum()
    if case.cp > 1:
        mesh = mesh_for(MeshDegrees(cp=case.cp))
        cp = ContextParallel(comm=case.comm)
        model = cp.apply(model, mesh)
        ids, local, positions = cp.shard_sequence(mesh, ids, shifted)
        shifted, n = cast(torch.Tensor, local), n / case.cp

    def step() -> torch.Tensor:
        out = model(
            ids, labels=shifted, shift_labels=shifted, position_ids=positions, num_items_in_batch=n
        )
        return out.loss

    loss, saved = _saved_bytes(step)
    loss.backward()
    for _ in range(warmup):
        step().backward()
    times = []
    for _ in range(steps):
        dist.barrier()
        begin = time.perf_counter()
        step().backward()
        times.append(time.perf_counter() - begin)
    model.zero_grad(set_to_none=True)
    return {"saved_bytes": saved, "time": sorted(times)[len(times) // 2]}
