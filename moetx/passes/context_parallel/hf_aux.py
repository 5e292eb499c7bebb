"""The router aux loss of a context-parallel Hugging Face model, over the whole sequences.

HF MoE causal LMs (Qwen3-MoE, Mixtral, OLMoE, gpt-oss) compute, when `output_router_logits`,
`aux = E * sum_e (count_e / T) * (prob_sum_e / T)` in `...ForCausalLM.forward`
(`load_balancing_loss_func`): `count_e` the top-k picks of expert e and `prob_sum_e` its routing
probabilities, summed over every layer's tokens, `T` the tokens times layers. Under CP each rank
would use its chunk only, and a product of means is not the mean of the ranks' products. A
forward hook on the model rebuilds the statistics from the router logits HF returns, sums them
over the cp group (counts without autograd; probability sums through an autograd-aware
all-gather, so each rank's loss carries the whole sequences' aux loss and, averaged over the cp
ranks as FSDP does, its single-process gradient), and swaps the global aux loss into `aux_loss`
and `loss`. It first checks that its rebuild equals HF's own local value, so a family whose
formula differs is refused (on every rank) rather than changed silently. Rows are this data
rank's: across data-parallel ranks the aux loss stays per rank, as HF computes it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from moetx.core.errors import PassPreconditionError

__all__ = ["AuxLossReducer"]


class AuxLossReducer:
    """Forward hook (with kwargs) replacing a cp rank's HF aux loss by the whole sequences' one."""

    def __init__(self, model: nn.Module, mesh: DeviceMesh) -> None:
        self.names = [n for n in inspect.signature(model.forward).parameters if n != "kwargs"]
        self.mesh = mesh

    def _stats(self, logits: tuple[Tensor, ...], experts: int, top_k: int) -> tuple[Tensor, ...]:
        counts = torch.zeros(experts, dtype=torch.float32, device=logits[0].device)
        probs = torch.zeros(experts, dtype=torch.float32, device=logits[0].device)
        for layer in logits:
            weights = torch.softmax(layer, dim=-1)
            picked = torch.topk(weights, top_k, dim=-1).indices.reshape(-1)
            counts = counts + torch.bincount(picked, minlength=experts).float()
            probs = probs + weights.float().sum(0)
        rows = torch.tensor(float(sum(layer.shape[0] for layer in logits)), device=counts.device)
        return counts, probs, rows

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        aux = getattr(output, "aux_loss", None)
        logits = getattr(output, "router_logits", None)
        if not isinstance(aux, Tensor) or not logits:
            return output
        hf: Any = module  # a transformers `...ForCausalLM`: these attributes are HF's
        experts, top_k = int(hf.num_experts), int(hf.num_experts_per_tok)
        counts, probs, rows = self._stats(tuple(logits), experts, top_k)
        local = experts * torch.sum((counts / rows) * (probs / rows))
        # A planning trace (`moetx.planning`) runs on meta: no values to check, same collectives.
        planning = local.device.type == "meta"
        known = planning or bool(
            torch.allclose(local.detach(), aux.detach().float(), rtol=1e-4, atol=1e-6)
        )
        group, degree = self.mesh.get_group(), self.mesh.size()
        # One collective for the counts, the token count and every rank's formula check.
        summed = funcol.all_reduce(
            torch.cat([counts, rows.view(1), counts.new_tensor([float(not known)])]), "sum", group
        )
        if not planning and summed[-1] > 0:
            raise PassPreconditionError(
                f"`{type(module).__name__}` returned a router aux loss that moetx cannot rebuild "
                f"from its router logits (on {int(summed[-1])} of {degree} cp rank(s)), so "
                "`ContextParallel` cannot compute it over the whole sequences.\n"
                "  fix: train without the aux loss (`output_router_logits=False`), or without "
                "context parallelism."
            )
        gathered = funcol.all_gather_single_autograd(probs.contiguous(), 0, group)
        total_probs = gathered.view(degree, experts).sum(0)
        total_counts, total_rows = summed[:experts], summed[experts]
        whole = experts * torch.sum((total_counts / total_rows) * (total_probs / total_rows))
        whole = whole.to(aux.dtype)
        call = {**dict(zip(self.names, args, strict=False)), **kwargs}
        loss = getattr(output, "loss", None)
        if loss is not None and call.get("labels") is not None:
            output.loss = loss + hf.router_aux_loss_coef * (whole - aux)
        output.aux_loss = whole
        return output

    def __repr__(self) -> str:
        return f"AuxLossReducer(degree={self.mesh.size()})"
