"""Rank bodies for `ContextParallel` on Hugging Face models: training parity and batch refusals.

The batch recipe under test (README, "The training loop"): shift the labels over the *whole*
sequences first (HF would shift inside each rank's chunk), shard tokens and shifted labels with
`shard_sequence`, pass the shifted labels as both `labels` (HF computes a loss only when given
labels) and `shift_labels` (which HF then uses unshifted), and normalise by the number of
targeted tokens of the global batch divided by the ranks FSDP averages over
(`num_items_in_batch`), so uneven `-100` spans still give the global-mean loss.
"""

from __future__ import annotations

import time
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import moetx
from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees, ParallelMesh
from moetx.passes.context_parallel.api import ContextParallel
from moetx.passes.expert_parallel.api import ExpertParallel
from moetx.passes.fsdp.api import FSDP
from moetx.testing.hf import HFSpec, build_model, tiny_config
from moetx.testing.parity import gradients, parameters
from moetx.testing.train import mesh_for

__all__ = [
    "IGNORE",
    "bad_batch_errors",
    "hf_cp_rank_train",
    "masked_batches",
    "rank_batches",
    "readme_recipe",
    "shift_labels",
    "train_hf",
    "two_models",
]

IGNORE = -100


def masked_batches(spec: HFSpec, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches of `rows` rows: `(input_ids, labels)`, labels with uneven `-100` spans.

    Each row ignores a random span (a prompt) and a random suffix (padding), so ranks and chunks
    hold different numbers of targeted tokens.
    """
    vocab = int(tiny_config(spec.family).vocab_size)
    g = torch.Generator().manual_seed(spec.seed + 1)
    out = []
    for _ in range(spec.steps):
        ids = torch.randint(0, vocab, (rows, spec.seq_len), generator=g)
        labels = ids.clone()
        for row in labels:
            a, b = sorted(torch.randint(0, spec.seq_len, (2,), generator=g).tolist())
            row[a : b + 1] = IGNORE
            row[spec.seq_len - int(torch.randint(0, 3, (1,), generator=g)) :] = IGNORE
        out.append((ids, labels))
    return out


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM shift, done on whole sequences: position t is scored on token t + 1."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE)


def rank_batches(
    spec: HFSpec, cp: ContextParallel, mesh: ParallelMesh, degrees: MeshDegrees, *, wrong: bool
) -> list[tuple[torch.Tensor, ...]]:
    """This rank's `(ids, shift_labels, positions, num_items_in_batch)` for every step.

    `wrong=True` shards first and shifts each rank's chunk afterwards (the bug the parity check
    must catch: a chunk's last token is scored on the wrong token, and one target is lost).
    """
    data_ranks = degrees.dp_replicate * degrees.dp_shard
    index = mesh.data_rank
    rows = slice(index * spec.rows_per_rank, (index + 1) * spec.rows_per_rank)
    out = []
    for ids, labels in masked_batches(spec, data_ranks * spec.rows_per_rank):
        if wrong:
            ids_l, labels_l, pos = cp.shard_sequence(mesh, ids[rows], labels[rows])
            shifted = shift_labels(cast(torch.Tensor, labels_l))
        else:
            ids_l, shifted_l, pos = cp.shard_sequence(mesh, ids[rows], shift_labels(labels[rows]))
            shifted = cast(torch.Tensor, shifted_l)
        # HF divides its CE sum by this; FSDP averages over the token ranks (tp ranks share tokens)
        count = moetx.count_tokens(shifted, mesh).total().item()
        out.append((ids_l, shifted, pos, count / mesh.degrees.token_ranks))
    return out


def train_hf(model: nn.Module, batches: list[tuple[Any, ...]], lr: float) -> dict[str, Any]:
    """AdamW steps; `moetx.testing.train.train`'s results.

    A batch is `(ids, labels)` (one process: HF's own loss, HF shifts) or `(ids, shift_labels,
    positions, num_items_in_batch)` (the CP recipe). AdamW's `eps` is 1e-5, not 1e-8: a router
    row that only ignored (-100) tokens chose gets a gradient of float noise (~1e-9), which
    eps=1e-8 would turn into an lr-sized step that differs between one process and the ranks.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, eps=1e-5)
    losses, grads, times = [], [], []
    for ids, shifted, *rest in batches:
        start = time.perf_counter()
        if rest:
            pos, n = rest
            out = model(
                ids, labels=shifted, shift_labels=shifted, position_ids=pos, num_items_in_batch=n
            )
        else:
            out = model(ids, labels=shifted)
        out.loss.backward()
        times.append(time.perf_counter() - start)
        losses.append(out.loss.detach().clone())
        grads.append(gradients(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"losses": losses, "grads": grads, "params": parameters(model), "step_times": times}


def hf_cp_rank_train(
    spec: HFSpec, pipeline: Pipeline, degrees: MeshDegrees, *, wrong_shift: bool = False
) -> dict[str, Any]:
    """Parallelize the spec's HF model with `pipeline` (which holds a `ContextParallel`) and
    train on this rank's rows and chunk; also returns the `state_dict` keys."""
    mesh = mesh_for(degrees)
    cp = next(p for p in pipeline if isinstance(p, ContextParallel))
    batches = rank_batches(spec, cp, mesh, degrees, wrong=wrong_shift)
    model = pipeline.apply(build_model(spec), mesh)
    result = train_hf(model, batches, spec.lr)
    result["state_dict_keys"] = sorted(model.state_dict())
    return result


def two_models(spec: HFSpec, comm: str) -> dict[str, Any]:
    """Rank body: two HF models built from *one* config object, only the first made cp.

    Returns the plain model's logits on a whole batch, the cp model's gathered logits on the
    same batch, and both models' attention implementation names.
    """
    mesh = mesh_for(MeshDegrees(cp=dist.get_world_size()))
    config = spec.config()
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        cls = type(build_model(spec))
        parallel, plain = cls(config), cls(config)
    plain.load_state_dict(parallel.state_dict())
    cp = ContextParallel(comm=comm)
    parallel = cp.apply(parallel, mesh)
    ids = masked_batches(spec, 2)[0][0]
    ids_l, _, pos = cp.shard_sequence(mesh, ids)
    with torch.no_grad():
        logits = cp.gather_sequence(mesh, parallel(ids_l, position_ids=pos).logits)
        plain_logits = plain(ids).logits
    return {
        "logits": logits,
        "plain_logits": plain_logits,
        "implementations": (
            parallel.config._attn_implementation,
            plain.config._attn_implementation,
        ),
    }


def bad_batch_errors(spec: HFSpec, padded_rank: int) -> dict[str, Any]:
    """Rank body: a padding mask on one rank only, then `labels` without `shift_labels` on
    every rank; returns the exceptions each call raised on this rank (None if it ran)."""
    mesh = mesh_for(MeshDegrees(cp=dist.get_world_size()))
    cp = ContextParallel()
    model = cp.apply(build_model(spec), mesh)
    ids, labels = masked_batches(spec, 2)[0]
    ids_l, labels_l, pos = cp.shard_sequence(mesh, ids, labels)
    mask = torch.ones_like(ids_l)
    if dist.get_rank() == padded_rank:
        mask[:, -1] = 0
    errors: dict[str, Any] = {}
    for name, kwargs in (
        ("padding", {"attention_mask": mask, "position_ids": pos}),
        ("labels", {"labels": labels_l, "position_ids": pos}),
        ("all_ones_mask", {"attention_mask": torch.ones_like(ids_l), "position_ids": pos}),
    ):
        try:
            model(ids_l, **kwargs)
            errors[name] = None
        except Exception as err:  # returned to the parent, which pins type and message
            errors[name] = err
    return errors


def readme_recipe(spec: HFSpec, code: str, degrees: MeshDegrees) -> torch.Tensor:
    """Rank body: run the README's HF batch recipe (`code`) on this rank's chunk; its loss."""
    mesh = mesh_for(degrees)
    ids, labels = masked_batches(spec, spec.rows_per_rank)[0]
    namespace: dict[str, Any] = {
        "torch": torch,
        "moetx": moetx,
        "hf_model": build_model(spec),
        "mesh": mesh,
        "ids": ids,
        "labels": labels,
        **{p.__name__: p for p in (ContextParallel, ExpertParallel, FSDP)},
    }
    exec(code, namespace)
    return cast(torch.Tensor, namespace["loss"]).detach()
