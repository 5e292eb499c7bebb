"""Rank bodies for the context-parallel tests and benchmark (importable by every rank)."""

from __future__ import annotations

import time
import typing
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import Attention, MoEConfig, MoETransformer, RotaryEmbedding
from moetx.passes.context_parallel.api import ContextParallel
from moetx.structure.discovery import discover
from moetx.testing.parity import gradients
from moetx.testing.train import TrainSpec, build_model, global_batches, mesh_for, train


@attrs.frozen(kw_only=True)
class CPCase:
    """One whole-model context-parallel example: model shape, batch shape, CP options."""

    batch: int = 2
    seq_len: int = 8
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 4
    num_layers: int = 2
    aux_loss_coef: float = 0.01
    comm: str = "allgather"
    load_balance: bool = True
    seed: int = 0

    def config(self) -> MoEConfig:
        """The model config: one dense block first, then MoE blocks."""
        return MoEConfig(
            vocab_size=32,
            hidden_size=16,
            num_layers=self.num_layers,
            num_dense_layers=1 if self.num_layers > 1 else 0,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            num_experts=4,
            top_k=2,
            expert_hidden_size=8,
            aux_loss_coef=self.aux_loss_coef,
        )

    def batch_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(input_ids, labels, position_ids)`, each `[B, S]`.

        Positions increase by random gaps of 1-4, different per row: not a uniform shift of
        `arange`, which RoPE (relative) could not tell from the truth.
        """
        g = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(0, 32, (self.batch, self.seq_len + 1), generator=g)
        gaps = torch.randint(1, 5, (self.batch, self.seq_len), generator=g)
        positions = gaps.cumsum(1) - gaps[:, :1]
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), positions


def model_outputs(model: nn.Module, ids: Any, labels: Any, positions: Any) -> dict[str, Any]:
    """Forward + backward; the attention outputs of every block, logits, losses and grads."""
    attention: list[torch.Tensor] = []
    hooks = [
        b.attention.register_forward_hook(lambda m, a, out: attention.append(out.detach()))
        for b in discover(model).blocks
    ]
    try:
        out = model(ids, labels=labels, position_ids=positions)
    finally:
        for h in hooks:
            h.remove()
    out.loss.backward()
    return {
        "attention": attention,
        "logits": out.logits.detach(),
        "loss": out.loss.detach(),
        "aux_loss": out.aux_loss.detach(),
        "grads": gradients(model),
    }


def cp_model_step(case: CPCase) -> dict[str, Any]:
    """Rank body: `ContextParallel` on cp = world size, one forward/backward of this rank's part.

    Also returns `index`, the global token indices of the rank's part, for the parent to put
    the pieces back in order.
    """
    degree = dist.get_world_size()
    mesh = mesh_for(MeshDegrees(cp=degree))
    cp = ContextParallel(comm=case.comm, load_balance=case.load_balance)
    model = cp.apply(MoETransformer(case.config()), mesh)
    ids, labels, positions = case.batch_tensors()
    index = cp.shard_sequence(mesh, torch.arange(case.seq_len))[0]
    local_ids, local_labels, local_positions = cp.shard_sequence(mesh, ids, labels, positions)
    result = model_outputs(model, local_ids, local_labels, local_positions)
    result["index"] = index
    result["gathered_logits"] = cp.gather_sequence(mesh, result["logits"]).detach()
    return result


def cp_ep_step(spec: TrainSpec, degrees: MeshDegrees, comm: str) -> dict[str, Any]:
    """Rank body: `ContextParallel() | ExpertParallel()`, one step on this rank's rows and chunk.

    Returns loss, every full gradient, the ep group, the names of sharded parameters, and the
    rank's data group.
    """
    from torch.distributed.tensor import DTensor

    from moetx.passes.expert_parallel.api import ExpertParallel

    mesh = mesh_for(degrees)
    rank = dist.get_rank()
    cp = ContextParallel(comm=comm)
    model = (cp | ExpertParallel()).apply(build_model(spec), mesh)
    data_index = rank // degrees.cp
    ids, labels = global_batches(spec, degrees.dp_shard)[0]
    rows = slice(data_index * spec.rows_per_rank, (data_index + 1) * spec.rows_per_rank)
    local_ids, local_labels, positions = cp.shard_sequence(mesh, ids[rows], labels[rows])
    out = model(local_ids, labels=local_labels, position_ids=positions)
    out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "grads": gradients(model),
        "ep_group": rank // degrees.ep,
        "sharded": sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor)),
    }


def silence_attention_(model: nn.Module) -> nn.Module:
    """Zero every attention output projection, so each MoE layer routes by token id alone."""
    with torch.no_grad():
        for block in discover(model).blocks:
            typing.cast(Attention, block.attention).o_proj.weight.zero_()
    return model


def token_routing(config: MoEConfig) -> list[list[int]]:
    """Experts each token id picks in the first MoE layer of a `silence_attention_` model."""
    model = MoETransformer(config)
    silence_attention_(model)
    block = next(b for b in discover(model).blocks if b.moe is not None)
    assert block.moe is not None
    norm = typing.cast(nn.Module, block.module.post_attention_layernorm)
    with torch.no_grad():
        hidden = norm(model.get_input_embeddings().weight)
        index, _, _ = block.moe.router(hidden)
    return index.tolist()


def cp_train_batches(
    config: MoEConfig,
    pipeline: Pipeline,
    degrees: MeshDegrees,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
) -> dict[str, Any]:
    """Rank body: train a `silence_attention_` model on given global batches (one data group)."""
    mesh = mesh_for(degrees)
    cp = next(p for p in pipeline if isinstance(p, ContextParallel))
    model = pipeline.apply(silence_attention_(MoETransformer(config)), mesh)
    local = [cp.shard_sequence(mesh, ids, labels) for ids, labels in batches]
    return train(model, local, lr)


# ----------------------------------------------------------------------------- benchmark


@attrs.frozen(kw_only=True)
class BenchCase:
    """One attention layer timed on every rank: the whole sequence split over `cp` ranks."""

    seq_len: int
    cp: int
    comm: str
    hidden_size: int = 256
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    batch: int = 1


def _saved_bytes(fn: Any) -> tuple[Any, int]:
    """Run `fn()`; return its result and the bytes of unique storages saved for backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def bench_attention(case: BenchCase, *, warmup: int, steps: int) -> dict[str, Any]:
    """Rank body for `benchmarks/context_parallel.py`: saved bytes and step time of one layer.

    With `case.cp == 1` every rank runs the whole sequence alone (the baseline); otherwise the
    ranks `[0, cp)` split it with `ContextParallel(comm=case.comm)` (the world must equal cp).
    """
    rank = dist.get_rank()
    torch.manual_seed(0)
    attn = Attention(case.hidden_size, case.num_heads, case.num_kv_heads, case.head_dim)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(case.batch, case.seq_len, case.hidden_size, generator=g)
    positions = torch.arange(case.seq_len).expand(case.batch, case.seq_len)
    if case.cp > 1:
        mesh = mesh_for(MeshDegrees(cp=case.cp))
        cp = ContextParallel(comm=case.comm)
        index = cp.shard_sequence(mesh, torch.arange(case.seq_len))[0]
        hidden, positions = hidden[:, index], positions[:, index]
        attn.core = cp_core(mesh, cp)
    cos, sin = RotaryEmbedding(case.head_dim)(positions)
    hidden.requires_grad_(True)

    def forward() -> torch.Tensor:
        return attn(hidden, (cos, sin))

    out, saved = _saved_bytes(forward)
    out.sum().backward()
    for _ in range(warmup):
        forward().sum().backward()
    times = []
    for _ in range(steps):
        dist.barrier()
        begin = time.perf_counter()
        forward().sum().backward()
        times.append(time.perf_counter() - begin)
    return {"rank": rank, "saved_bytes": saved, "time": sorted(times)[len(times) // 2]}


def cp_core(mesh: Any, cp: ContextParallel) -> nn.Module:
    """The attention kernel `cp` installs, for a bare `Attention` outside a model."""
    from moetx.passes.context_parallel.attention import ContextParallelAttentionCore

    return ContextParallelAttentionCore(mesh[cp.axis], cp.comm, cp.load_balance)
