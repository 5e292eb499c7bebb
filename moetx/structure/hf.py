"""Structure adapter for Hugging Face transformers models, registered into `moetx.structure.discovery`.

transformers 5 decoder-only MoE families (Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3, OLMoE,
gpt-oss, GraniteMoE, ...) are laid out as moetx's conventions expect: `model.layers[i]` blocks
with `self_attn` and an `mlp` (or `block_sparse_moe`) holding a `gate`/`router`, stacked
`experts` called as `experts(hidden, top_k_index, top_k_weights)` and optional
`shared_experts`/`shared_expert`. So this adapter discovers HF models with the convention
discovery and adds what only knowing HF can check:

- **Every experts module is accounted for.** A module holding stacked experts (transformers
  names every such class `...Experts`) that is not the `experts` of a discovered MoE layer means
  the family routes tokens in a way moetx does not know (Gemma 4 keeps `router` and `experts` on
  the decoder layer itself). Discovery then raises `UnknownModelStructureError` naming those
  modules, instead of reporting a dense model (which `ExpertParallel` would refuse with a
  misleading "leave it out for dense models", and `FSDP` would shard as dense).
- **Errors name the HF model type**, and what moetx looked for.

Dense HF models (Llama, ...) are discovered as dense: `ExpertParallel` raises `NoMoELayersError`.
`ContextParallel` shards HF attention through transformers' attention registry
(`moetx.passes.context_parallel.hf`).

transformers is never imported here: HF models are recognised by their classes' modules, so
registering the adapter costs nothing when transformers is absent.
"""

from __future__ import annotations

from torch import nn

from moetx.core.errors import UnknownModelStructureError
from moetx.structure.discovery import (
    MOE_NAMES,
    ROUTER_NAMES,
    ModelStructure,
    discover_by_convention,
    register_structure_adapter,
)

__all__ = ["hf_model_type", "hf_structure"]

_EXPERTS_CLASS_SUFFIX = "Experts"  # transformers 5: `Qwen3MoeExperts`, `MixtralExperts`, ...


def hf_model_type(model: nn.Module) -> str | None:
    """`model.config.model_type` if `model` is a transformers model, else None.

    A model is a transformers model when a class in its MRO is defined in the `transformers`
    package (wrapper subclasses made by FSDP2 or moetx passes keep the original in their MRO).
    """
    if not any(c.__module__.partition(".")[0] == "transformers" for c in type(model).__mro__):
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) else None


@register_structure_adapter
def hf_structure(model: nn.Module) -> ModelStructure | None:
    """The structure of a transformers model; None for any other model.

    Raises:
        UnknownModelStructureError: the model's blocks, attention or MoE layers are not where
            moetx looks, or it has experts outside every MoE layer moetx found.
    """
    model_type = hf_model_type(model)
    if model_type is None:
        return None
    what = f"Hugging Face `{model_type}` model `{type(model).__name__}`"
    try:
        structure = discover_by_convention(model)
    except UnknownModelStructureError as err:
        raise UnknownModelStructureError(
            f"{err}\n"
            f"  model: a {what}; moetx knows decoder-only families laid out as "
            "`model.layers[i].self_attn` and `model.layers[i].mlp.{gate, experts}` "
            "(Qwen3-MoE, Mixtral, DeepSeek-V3, OLMoE, gpt-oss, ...).\n"
            "  fix: register a structure adapter for this family "
            "(`moetx.structure.register_structure_adapter`)."
        ) from err
    _check_every_experts_module_is_placed(model, structure, what)
    return structure


def _check_every_experts_module_is_placed(
    model: nn.Module, structure: ModelStructure, what: str
) -> None:
    placed = {id(layer.experts) for layer in structure.moe_layers()}
    stray = [
        (fqn, type(m).__name__)
        for fqn, m in model.named_modules()
        if id(m) not in placed and _holds_stacked_experts(m)
    ]
    if not stray:
        return
    moe = " or ".join(f"`{n}`" for n in MOE_NAMES)
    router = " or ".join(f"`{n}`" for n in ROUTER_NAMES)
    blocks = structure.blocks[0].fqn.rpartition(".")[0] if structure.blocks else "model.layers"
    listed = ", ".join(f"`{fqn}` (`{cls}`)" for fqn, cls in stray[:3])
    more = f" and {len(stray) - 3} more" if len(stray) > 3 else ""
    raise UnknownModelStructureError(
        f"The {what} has experts that are not in any MoE layer moetx knows: {listed}{more}.\n"
        f"  looked for: in each block `{blocks}.<i>`, an {moe} child with an `experts` child "
        f"and a {router} child.\n"
        "  why: moetx would treat these experts as dense weights, and expert parallelism would "
        "not apply to them.\n"
        "  fix: register a structure adapter for this family "
        "(`moetx.structure.register_structure_adapter`)."
    )


def _holds_stacked_experts(module: nn.Module) -> bool:
    # Only modules that own parameters: the name test must not catch containers.
    if next(module.parameters(recurse=False), None) is None:
        return False
    return any(c.__name__.endswith(_EXPERTS_CLASS_SUFFIX) for c in type(module).__mro__)
