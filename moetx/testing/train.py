"""Training-parity runs: the same synthetic model trained in one process and on real ranks.

The single-process reference trains on the *global* batch; each rank trains on its rows (and,
under context parallelism, its sequence chunk). With equal tokens per rank, the global-mean
loss is the mean of the rank losses, and a correctly parallelized model has the reference's
gradients (gathered to full tensors) at every step and its parameters after every step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs
import torch
from torch import nn

from moetx import MeshDegrees, ParallelMesh, Pipeline, shard_batch
from moetx.models import MoEConfig, MoETransformer, init_weights_, update_routing_bias_
from moetx.structure import discover
from moetx.structure.tensors import local_bytes
from moetx.testing.parity import compare, gradients, parameters
from moetx.testing.ranks import cached, rank_device


@attrs.frozen(kw_only=True)
class TrainSpec:
    """Everything both sides need to build the same model and the same data."""

    config: MoEConfig
    seed: int = 0
    steps: int = 3
    rows_per_rank: int = 2
    seq_len: int = 8
    lr: float = 1e-2
    #: FQN prefixes of parameters to freeze (`requires_grad=False`), as in partial fine-tuning.
    frozen: tuple[str, ...] = ()
    #: Compute dtype of the reference's parameters (mirrors an FSDP `param_dtype`); the router
    #: stays float32, as FSDP's default `fp32_modules` keeps it.
    param_dtype: str | None = None
    #: Aux-loss-free balancing: after every optimizer step, `update_routing_bias_(model,
    #: bias_rate)` (0: never). Needs `MoEConfig(routing_bias=True)` to do anything; every rank
    #: then moves its bias by the global routing load, as the reference does.
    bias_rate: float = 0.0


def global_batches(spec: TrainSpec, data_ranks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` global batches of `data_ranks * rows_per_rank` rows: (input_ids, aligned labels)."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    out = []
    for _ in range(spec.steps):
        ids = torch.randint(
            0,
            spec.config.vocab_size,
            (data_ranks * spec.rows_per_rank, spec.seq_len + 1),
            generator=g,
        )
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return out


def build_model(spec: TrainSpec, *, meta: bool = False) -> nn.Module:
    """The synthetic model with moetx's deterministic init (identical on every rank).

    With `meta=True` the model is built on the meta device and left uninitialised: apply a
    pipeline, then `materialize(model, spec)`.
    """
    if meta:
        with torch.device("meta"):
            model = MoETransformer(spec.config)
    else:
        model = MoETransformer(spec.config)
        init_weights_(model, spec.seed)
    for name, p in model.named_parameters():
        if name.startswith(spec.frozen) and spec.frozen:
            p.requires_grad_(False)
    return model


def materialize(model: nn.Module, spec: TrainSpec, device: torch.device | str = "cpu") -> nn.Module:
    """Allocate a meta-built (possibly sharded) model on `device` and run the deterministic init."""
    model.to_empty(device=device)
    init_weights_(model, spec.seed)
    return model


def _low_precision_forward(model: nn.Module, dtype: torch.dtype) -> Any:
    keep = {id(p) for layer in discover(model).moe_layers() for p in layer.router.parameters()}

    def forward(ids: torch.Tensor, labels: torch.Tensor, position_ids: Any = None) -> Any:
        cast = {n: (p if id(p) in keep else p.to(dtype)) for n, p in model.named_parameters()}
        kwargs = {"labels": labels, "position_ids": position_ids}
        return torch.func.functional_call(model, cast, (ids,), kwargs)

    return forward


class Trainer:
    """AdamW on one model, one step at a time, so a caller can report progress between steps.

    A batch is `(input_ids, labels)`, or `(input_ids, labels, position_ids)` (context parallel).
    `param_dtype` runs the forward on parameters cast to that dtype (fp32 master weights), the
    single-process mirror of FSDP's mixed precision. A `bias_rate` applies
    `update_routing_bias_` after every optimizer step (aux-loss-free balancing).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        *,
        param_dtype: str | None = None,
        bias_rate: float = 0.0,
    ) -> None:
        self.model = model
        self.bias_rate = bias_rate
        self.opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01
        )
        self.forward = (
            _low_precision_forward(model, getattr(torch, param_dtype))
            if param_dtype
            else lambda ids, labels, position_ids=None: model(
                ids, labels=labels, position_ids=position_ids
            )
        )

    def step(self, batch: tuple[Any, ...]) -> dict[str, Any]:
        """One step: loss, full gradients, local gradient bytes and the step time."""
        ids, labels, *positions = batch
        start = time.perf_counter()
        out = self.forward(ids, labels, *positions)
        out.loss.backward()
        elapsed = time.perf_counter() - start
        params = list(self.model.parameters())
        grad_bytes = local_bytes(p.grad for p in params if p.grad is not None)
        grads = gradients(self.model)
        start = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.bias_rate:
            update_routing_bias_(self.model, self.bias_rate)
        return {
            "loss": out.loss.detach().to("cpu", copy=True),
            "grads": grads,
            "grad_bytes": grad_bytes,
            # fwd + bwd + optimizer step, without the gradient gathering
            "step_time": elapsed + time.perf_counter() - start,
        }


def train(
    model: nn.Module,
    batches: list[tuple[Any, ...]],
    lr: float,
    *,
    param_dtype: str | None = None,
    bias_rate: float = 0.0,
) -> dict[str, Any]:
    """AdamW steps on `batches`; returns per-step losses and full gradients, and final params."""
    trainer = Trainer(model, lr, param_dtype=param_dtype, bias_rate=bias_rate)
    steps = [trainer.step(batch) for batch in batches]
    return {
        "losses": [s["loss"] for s in steps],
        "grads": [s["grads"] for s in steps],
        "params": parameters(model),
        "step_times": [s["step_time"] for s in steps],
        "grad_bytes": steps[-1]["grad_bytes"] if steps else 0,
    }


def reference(spec: TrainSpec, data_ranks: int) -> dict[str, Any]:
    """Single-process training on the global batches."""
    return train(
        build_model(spec),
        global_batches(spec, data_ranks),
        spec.lr,
        param_dtype=spec.param_dtype,
        bias_rate=spec.bias_rate,
    )


def mesh_for(degrees: MeshDegrees) -> ParallelMesh:
    """The rank's ParallelMesh for `degrees`, built once per rank process."""
    d = attrs.asdict(degrees)
    return cached(("moetx.ParallelMesh", tuple(sorted(d.items()))), lambda: ParallelMesh.build(**d))


def _rank_setup(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, *, meta: bool = False
) -> tuple[nn.Module, list[tuple[Any, ...]]]:
    """This rank's parallelized model and its part of every global batch (`shard_batch`), on
    the rank's device (`rank_device()`: the CPU under gloo, its GPU under NCCL)."""
    mesh = mesh_for(degrees)
    device = rank_device()
    model = build_model(spec, meta=meta)
    model = pipeline.apply(model if meta else model.to(device), mesh)
    if meta:
        materialize(model, spec, device)
    batches: list[tuple[Any, ...]] = [
        tuple(t if t is None else t.to(device) for t in shard_batch(model, mesh, ids, labels))
        for ids, labels in global_batches(spec, mesh.data_size)
    ]
    return model, batches


def rank_train(
    spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees, *, meta: bool = False
) -> dict[str, Any]:
    """Rank body: build, parallelize with `pipeline`, train on this rank's rows; return results.

    With `meta=True` the model is built on the meta device, parallelized, then materialized, so
    no rank ever holds more than its shards.
    """
    model, batches = _rank_setup(spec, pipeline, degrees, meta=meta)
    result = train(model, batches, spec.lr, bias_rate=spec.bias_rate)
    result["requires_grad"] = {n: p.requires_grad for n, p in model.named_parameters()}
    result["param_bytes"] = local_bytes(p for p in model.parameters())
    return result


# Step-by-step training across pool calls (for progress displays): this rank process's session.
_SESSION: dict[str, Any] = {}


def rank_session_start(spec: TrainSpec, pipeline: Pipeline, degrees: MeshDegrees) -> int:
    """Rank body: set up a step-by-step training session; returns this rank's parameter bytes."""
    model, batches = _rank_setup(spec, pipeline, degrees)
    _SESSION.clear()
    _SESSION.update(trainer=Trainer(model, spec.lr, bias_rate=spec.bias_rate), batches=batches)
    return local_bytes(p for p in model.parameters())


def rank_session_step(step: int) -> dict[str, Any]:
    """Rank body: run step `step` of the session started by `rank_session_start`."""
    return _SESSION["trainer"].step(_SESSION["batches"][step])  # type: ignore[no-any-return]


def rank_session_end() -> dict[str, Any]:
    """Rank body: the session's final full parameters; ends the session."""
    params = parameters(_SESSION["trainer"].model)
    _SESSION.clear()
    return params


def _quiet_redistribute_warnings() -> None:
    # Gathering FSDP-over-EP gradients (_StridedShard) makes DTensor warn that it needs two
    # all-gathers; that is expected when gathering for a comparison and only adds noise.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


_quiet_redistribute_warnings()


def mean_losses(results: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Per-step global loss: the mean of the ranks' losses (equal tokens per rank)."""
    steps = len(results[0]["losses"])
    return [torch.stack([r["losses"][s] for r in results]).mean() for s in range(steps)]


def assert_matches_reference(
    results: list[dict[str, Any]],
    ref: dict[str, Any],
    *,
    atol: float = 2e-5,
    rtol: float = 1e-4,
) -> None:
    """Assert rank results (from `train`) equal a reference `train` run: the mean rank loss at
    every step, every rank's gathered gradients at every step, and its final parameters.

    Gradients are compared every step (not only losses and final parameters): AdamW is nearly
    invariant to a constant gradient scale, so a 2x expert-gradient bug hides from the others.
    """
    for step, (got, want) in enumerate(zip(mean_losses(results), ref["losses"], strict=True)):
        compare({"loss": want}, {"loss": got}, atol=atol, rtol=rtol, what=f"loss at step {step}")
    for r, res in enumerate(results):
        for step in range(len(ref["grads"])):
            what = f"rank {r} grads, step {step}"
            compare(ref["grads"][step], res["grads"][step], atol=atol, rtol=rtol, what=what)
        compare(ref["params"], res["params"], atol=atol, rtol=rtol, what=f"rank {r} params")


def assert_training_parity(
    results: list[dict[str, Any]],
    spec: TrainSpec,
    degrees: MeshDegrees,
    *,
    atol: float = 2e-5,
    rtol: float = 1e-4,
) -> None:
    """`rank_train` results equal the single-process model trained on the global batches."""
    ref = reference(spec, degrees.dp_replicate * degrees.dp_shard)
    assert_matches_reference(results, ref, atol=atol, rtol=rtol)
