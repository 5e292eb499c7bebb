"""Rank bodies: a researcher's training loop built only from public moetx calls."""

from __future__ import annotations

from typing import Any

import torch

import moetx
from moetx.models import update_routing_bias_
from moetx.structure import discover
from moetx.testing import gradients, parameters
from moetx.testing.parity import clean_fqn
from moetx.testing.train import TrainSpec, build_model, global_batches, mesh_for


def masked_batches(spec: TrainSpec, data_ranks: int, ignore: torch.Tensor) -> list[Any]:
    """The global batches with `ignore[step]` positions of the labels set to -100."""
    return [
        (ids, labels.masked_fill(ignore[step], moetx.training.IGNORE_INDEX))
        for step, (ids, labels) in enumerate(global_batches(spec, data_ranks))
    ]


def public_loop(
    spec: TrainSpec, pipeline: moetx.Pipeline, degrees: moetx.MeshDegrees, ignore: torch.Tensor
) -> dict[str, Any]:
    """Train on the global batches with shard_batch / count_tokens / token_mean_loss /
    sync_gradients (when the pipeline has no FSDP) and, with `spec.bias_rate`,
    update_routing_bias_ after each step; return losses, gradients, final params and biases."""
    mesh = mesh_for(degrees)
    model = pipeline.apply(build_model(spec), mesh)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=spec.lr, weight_decay=0.01
    )
    has_fsdp = any(p.placement.stage == "fsdp" for p in pipeline)
    if not pipeline:  # no pass summed the routing-load counters over the token ranks
        moetx.sync_routing_load(model, mesh)
    losses, grads = [], []
    for ids, labels in masked_batches(spec, mesh.data_size, ignore):
        batch = moetx.shard_batch(model, mesh, ids, labels)
        count = moetx.count_tokens(batch.labels, mesh)
        out = model(batch.input_ids, position_ids=batch.position_ids)
        loss = moetx.token_mean_loss(out.logits, batch.labels, mesh, num_tokens=count)
        loss = loss + out.aux_loss
        loss.backward()
        if not has_fsdp:
            moetx.sync_gradients(model, mesh)
        losses.append(loss.detach().clone())
        grads.append(gradients(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if spec.bias_rate:
            update_routing_bias_(model, spec.bias_rate)
    return {
        "losses": losses,
        "grads": grads,
        "params": parameters(model),
        "biases": routing_biases(model),
    }


def routing_biases(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every router's aux-loss-free selection bias, by the router's FQN (none: `{}`)."""
    return {
        clean_fqn(layer.router_fqn): layer.router.get_buffer("e_score_correction_bias").clone()
        for layer in discover(model).moe_layers()
        if getattr(layer.router, "e_score_correction_bias", None) is not None
    }


def data_coordinates(degrees: moetx.MeshDegrees) -> tuple[int, int, int]:
    """(global rank, mesh.data_rank, mesh.data_size) on this rank."""
    mesh = mesh_for(degrees)
    return torch.distributed.get_rank(), mesh.data_rank, mesh.data_size


def sync_on_fsdp_model(spec: TrainSpec, degrees: moetx.MeshDegrees) -> str:
    """The message `sync_gradients` raises on an FSDP model."""
    mesh = mesh_for(degrees)
    model = moetx.FSDP().apply(build_model(spec), mesh)
    try:
        moetx.sync_gradients(model, mesh)
    except moetx.GradientSyncError as e:
        return str(e)
    return "no error"


def sync_with_local_load(spec: TrainSpec, degrees: moetx.MeshDegrees) -> dict[str, Any]:
    """A plain model (no pass, no `sync_routing_load`), one forward + backward on this rank's
    rows, then `sync_gradients`: its message, and whether gradients and counters are untouched."""
    mesh = mesh_for(degrees)
    model = build_model(spec)
    ids, labels = global_batches(spec, mesh.data_size)[0]
    batch = moetx.shard_batch(model, mesh, ids, labels)
    model(batch.input_ids, labels=batch.labels).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    loads = {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_load")}
    try:
        moetx.sync_gradients(model, mesh)
        msg = "no error"
    except moetx.LoadSyncError as e:
        msg = str(e)
    untouched = all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters()) and all(
        torch.equal(b, loads[n]) for n, b in model.named_buffers() if n in loads
    )
    return {"msg": msg, "untouched": untouched}
