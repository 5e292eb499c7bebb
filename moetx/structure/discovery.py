"""Model-structure discovery: the only place in moetx that knows models' attribute names.

Passes ask `discover(model)` for blocks, attention and MoE layers instead of reaching into
attributes themselves. Discovery follows Hugging Face transformers conventions (Qwen3-MoE,
DeepSeek-V3, Mixtral), so moetx's own models and HF models share one code path. Other
families plug in with `register_structure_adapter`.

Wrappers are looked through: activation checkpointing's `CheckpointWrapper` (child
`_checkpoint_wrapped_module`), `torch.compile`'s `_orig_mod` and FSDP1's
`_fsdp_wrapped_module`. Reported FQNs are those of the *inner* modules exactly as
`model.named_modules()` / `named_parameters()` print them (wrapper segments included), so
they can be used with `get_submodule` and state-dict keys as they are. `canonical_fqn` strips
the wrapper segments. Nothing checks classes by identity: FSDP2 swaps a module's class for a
subclass (`FSDPMoEBlock`), so only attribute names and shapes are used.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from torch import nn

from moetx.core.errors import UnknownModelStructureError

__all__ = [
    "MOE_NAMES",
    "ROUTER_NAMES",
    "WRAPPER_ATTRS",
    "Block",
    "MoELayer",
    "ModelStructure",
    "StructureAdapter",
    "canonical_fqn",
    "discover",
    "discover_by_convention",
    "register_structure_adapter",
]

WRAPPER_ATTRS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")
"""Child names under which wrappers keep the module they wrap."""

_BACKBONE_PREFIXES = ("model", "")
MOE_NAMES = ("mlp", "block_sparse_moe")  # block children that may be the MoE sublayer
ROUTER_NAMES = ("gate", "router")  # MoE-sublayer children that may be the router
_SHARED_NAMES = ("shared_experts", "shared_expert")
_COUNTER_BUFFER_NAMES = ("expert_load", "tokens_per_expert")  # moetx / torchtitan load counters
_ATTENTION_CORE_NAME = "core"  # moetx's attention-kernel seam (`Attention.core`)
_STATS_REDUCER_NAME = "stats_reducer"  # moetx's aux-loss statistics hook (`MoEBlock`)
_NUM_EXPERTS_NAME = "num_experts"  # expert count on the experts module (moetx, HF transformers)


@attrs.frozen(eq=False)
class MoELayer:
    """One routed-MoE sublayer. Hashable and comparable by identity.

    Attributes:
        fqn: Its FQN, e.g. `"model.layers.1.mlp"`.
        module: The MoE module.
        router_fqn: FQN of the router.
        router: The router (`gate` or `router` child).
        experts_fqn: FQN of the experts module.
        experts: The experts module; obeys the experts contract of `moetx.models.RoutedExperts`.
        expert_param_names: Names (relative to `experts`) of its stacked `[E, ...]` parameters.
        shared_experts_fqn: FQN of the shared experts, or None.
        shared_experts: The always-on experts, or None.
        num_experts: E (global, even when the parameters are sharded DTensors).
        top_k: Experts per token.
        counter_buffer_names: Names (relative to `module`) of buffers its forward accumulates
            into, e.g. `("gate.expert_load",)`; a recomputed forward must not add to them twice.
        stats_reducer_attr: Name of the attribute of `module` through which its aux-loss
            statistics can be reduced over sequence shards (`"stats_reducer"`, see
            `moetx.models.StatsReducer`), or None if it has no such hook.
        num_experts_attr: Name of the int attribute of `experts` holding its expert count
            (`"num_experts"`), which its forward may read (HF transformers' experts do:
            `one_hot(num_classes=...)`, grouped_mm offsets); None if it has none.
    """

    fqn: str
    module: nn.Module
    router_fqn: str
    router: nn.Module
    experts_fqn: str
    experts: nn.Module
    expert_param_names: tuple[str, ...]
    shared_experts_fqn: str | None
    shared_experts: nn.Module | None
    num_experts: int
    top_k: int
    counter_buffer_names: tuple[str, ...] = ()
    stats_reducer_attr: str | None = None
    num_experts_attr: str | None = None


@attrs.frozen(eq=False)
class Block:
    """One transformer block (backbone or MTP). Hashable and comparable by identity.

    Attributes:
        fqn: FQN of the block (the module inside any checkpoint wrapper).
        module: The block.
        attention_fqn: FQN of its attention module.
        attention: The attention module (`self_attn`).
        moe: Its routed-MoE sublayer, or None for a dense block.
        is_mtp: Whether the block belongs to a multi-token-prediction head.
        attention_core_fqn: FQN of the attention's kernel (its `core` child), or None.
        attention_core: The kernel module `core(q, k, v)` (see `moetx.models.CausalAttentionCore`),
            or None if the attention has no `core` child.
    """

    fqn: str
    module: nn.Module
    attention_fqn: str
    attention: nn.Module
    moe: MoELayer | None
    is_mtp: bool
    attention_core_fqn: str | None = None
    attention_core: nn.Module | None = None


@attrs.frozen(eq=False)
class ModelStructure:
    """The parts of a model that passes transform. Hashable and comparable by identity.

    Attributes:
        blocks: Backbone blocks in order, then MTP blocks.
        embedding_fqn: FQN of the input embedding.
        embedding: The input embedding.
        lm_head_fqn: FQN of the output projection, or None.
        lm_head: The output projection, or None.
        final_norm_fqn: FQN of the backbone's final norm, or None.
        final_norm: The final norm, or None.
        tied_embeddings: Whether `lm_head.weight` is the embedding's weight object.
    """

    blocks: tuple[Block, ...]
    embedding_fqn: str
    embedding: nn.Module
    lm_head_fqn: str | None
    lm_head: nn.Module | None
    final_norm_fqn: str | None
    final_norm: nn.Module | None
    tied_embeddings: bool

    def moe_layers(self) -> tuple[MoELayer, ...]:
        """Return every routed-MoE sublayer, in block order (empty for a dense model)."""
        return tuple(b.moe for b in self.blocks if b.moe is not None)

    def expert_parameters(self) -> dict[str, nn.Parameter]:
        """Return every stacked routed-expert parameter by FQN (as in `named_parameters()`)."""
        params: dict[str, nn.Parameter] = {}
        for moe in self.moe_layers():
            for name in moe.expert_param_names:
                params[f"{moe.experts_fqn}.{name}"] = getattr(moe.experts, name)
        return params


StructureAdapter = Callable[[nn.Module], "ModelStructure | None"]
"""Returns the structure of models it recognises, `None` for others."""

_ADAPTERS: list[StructureAdapter] = []


def register_structure_adapter(adapter: StructureAdapter) -> StructureAdapter:
    """Add `adapter` to the adapters `discover` tries, after those already registered.

    The HF-conventions discovery always runs last. Usable as a decorator.

    Args:
        adapter: Called with the model; returns its `ModelStructure`, or `None` if the model
            is not one it knows.

    Returns:
        `adapter`, unchanged.
    """
    _ADAPTERS.append(adapter)
    return adapter


def discover(model: nn.Module) -> ModelStructure:
    """Find the blocks, attention, MoE layers, embedding and head of `model`.

    Works on meta-device models, DTensor parameters, FSDP2-swapped classes and
    checkpoint-wrapped blocks.

    Raises:
        UnknownModelStructureError: No adapter recognised the model and the HF conventions
            did not match; the message says what was looked for.
    """
    for adapter in _ADAPTERS:
        structure = adapter(model)
        if structure is not None:
            return structure
    return discover_by_convention(model)


def canonical_fqn(fqn: str) -> str:
    """Drop wrapper segments: `"layers.0._checkpoint_wrapped_module.mlp"` -> `"layers.0.mlp"`."""
    return ".".join(part for part in fqn.split(".") if part not in WRAPPER_ATTRS)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unwrap(module: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    while True:
        inner = next((module._modules[a] for a in WRAPPER_ATTRS if a in module._modules), None)
        if inner is None:
            return module, fqn
        fqn = _join(fqn, next(a for a in WRAPPER_ATTRS if a in module._modules))
        module = inner


def _child(module: nn.Module, fqn: str, name: str) -> tuple[nn.Module, str] | None:
    child = module._modules.get(name)
    if child is None:
        return None
    return _unwrap(child, _join(fqn, name))


def _path(root: nn.Module, dotted: str) -> tuple[nn.Module, str] | None:
    found: tuple[nn.Module, str] | None = _unwrap(root, "")
    for name in dotted.split(".") if dotted else ():
        if found is None:
            return None
        found = _child(*found, name)
    return found


def _first(module: nn.Module, fqn: str, names: tuple[str, ...]) -> tuple[nn.Module, str] | None:
    return next((c for n in names if (c := _child(module, fqn, n)) is not None), None)


def discover_by_convention(model: nn.Module) -> ModelStructure:
    """Discover `model` by the naming conventions alone (adapters call it, then add checks)."""
    cls = type(model).__name__
    for prefix in _BACKBONE_PREFIXES:
        found = _path(model, _join(prefix, "layers"))
        if found is not None and isinstance(found[0], nn.ModuleList):
            layers, layers_fqn = found
            break
    else:
        looked = " and ".join(f"`{_join(p, 'layers')}`" for p in _BACKBONE_PREFIXES)
        raise UnknownModelStructureError(
            f"`{cls}` has no decoder layers: looked for {looked} (an nn.ModuleList)."
        )
    blocks = [
        _block(cls, *_unwrap(layer, _join(layers_fqn, name)), is_mtp=False)
        for name, layer in layers.named_children()
    ]
    blocks += [_block(cls, m, f, is_mtp=True) for m, f in _mtp_blocks(model)]
    embedding, embedding_fqn = _embedding(model, prefix, cls)
    lm_head = _child(*_unwrap(model, ""), "lm_head")
    norm = _path(model, _join(prefix, "norm"))
    head_weight = getattr(lm_head[0], "weight", None) if lm_head else None
    return ModelStructure(
        blocks=tuple(blocks),
        embedding_fqn=embedding_fqn,
        embedding=embedding,
        lm_head_fqn=lm_head[1] if lm_head else None,
        lm_head=lm_head[0] if lm_head else None,
        final_norm_fqn=norm[1] if norm else None,
        final_norm=norm[0] if norm else None,
        tied_embeddings=head_weight is not None
        and head_weight is getattr(embedding, "weight", None),
    )


def _mtp_blocks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    # moetx / DeepSeek-V3 style: `mtp[i].block`; `mtp.layers[i]` is also accepted.
    found = _child(*_unwrap(model, ""), "mtp")
    if found is None:
        return []
    mtp, mtp_fqn = found
    if not isinstance(mtp, nn.ModuleList):
        found = _child(mtp, mtp_fqn, "layers")
        if found is None or not isinstance(found[0], nn.ModuleList):
            return []
        mtp, mtp_fqn = found
    entries = [_unwrap(m, _join(mtp_fqn, n)) for n, m in mtp.named_children()]
    return [_child(m, f, "block") or (m, f) for m, f in entries]


def _block(cls: str, block: nn.Module, fqn: str, *, is_mtp: bool) -> Block:
    attention = _child(block, fqn, "self_attn")
    if attention is None:
        raise UnknownModelStructureError(
            f"`{cls}` block `{fqn}` has no attention: looked for `{_join(fqn, 'self_attn')}`."
        )
    core = _child(*attention, _ATTENTION_CORE_NAME)
    return Block(
        fqn=fqn,
        module=block,
        attention_fqn=attention[1],
        attention=attention[0],
        moe=_moe_layer(cls, block, fqn),
        is_mtp=is_mtp,
        attention_core_fqn=core[1] if core else None,
        attention_core=core[0] if core else None,
    )


def _moe_layer(cls: str, block: nn.Module, block_fqn: str) -> MoELayer | None:
    for name in MOE_NAMES:
        found = _child(block, block_fqn, name)
        if found is None:
            continue
        moe, fqn = found
        experts = _child(moe, fqn, "experts")
        router = _first(moe, fqn, ROUTER_NAMES)
        if experts is not None and router is not None:
            return _build_moe_layer(cls, moe, fqn, experts, router)
    return None


def _build_moe_layer(
    cls: str,
    moe: nn.Module,
    fqn: str,
    experts: tuple[nn.Module, str],
    router: tuple[nn.Module, str],
) -> MoELayer:
    (experts_mod, experts_fqn), (router_mod, router_fqn) = experts, router
    num_experts = getattr(experts_mod, _NUM_EXPERTS_NAME, None)
    count_attr = _NUM_EXPERTS_NAME if isinstance(num_experts, int) else None
    if not isinstance(num_experts, int):
        weight = getattr(router_mod, "weight", None)
        if weight is None:
            raise UnknownModelStructureError(
                f"`{cls}` MoE layer `{fqn}` has no expert count: looked for "
                f"`{experts_fqn}.num_experts` and the rows of `{router_fqn}.weight`."
            )
        num_experts = int(weight.shape[0])
    top_k = _top_k(router_mod, moe)
    if top_k is None:
        raise UnknownModelStructureError(
            f"`{cls}` MoE layer `{fqn}` has no top-k: looked for `{router_fqn}.top_k`, "
            f"`{fqn}.top_k` and `{fqn}.num_experts_per_tok`."
        )
    names = tuple(
        n
        for n, p in experts_mod.named_parameters(recurse=False)
        if p.dim() >= 1 and p.shape[0] == num_experts
    )
    if not names:
        raise UnknownModelStructureError(
            f"`{cls}` experts `{experts_fqn}` have no stacked expert parameters: looked for "
            f"direct parameters whose dim 0 is `num_experts` ({num_experts})."
        )
    shared = _first(moe, fqn, _SHARED_NAMES)
    counters = tuple(
        n for n, _ in moe.named_buffers() if n.rpartition(".")[2] in _COUNTER_BUFFER_NAMES
    )
    return MoELayer(
        fqn=fqn,
        module=moe,
        router_fqn=router_fqn,
        router=router_mod,
        experts_fqn=experts_fqn,
        experts=experts_mod,
        expert_param_names=names,
        shared_experts_fqn=shared[1] if shared else None,
        shared_experts=shared[0] if shared else None,
        num_experts=num_experts,
        top_k=top_k,
        counter_buffer_names=counters,
        stats_reducer_attr=_STATS_REDUCER_NAME if hasattr(moe, _STATS_REDUCER_NAME) else None,
        num_experts_attr=count_attr,
    )


def _top_k(router: nn.Module, moe: nn.Module) -> int | None:
    for owner, attr in ((router, "top_k"), (moe, "top_k"), (moe, "num_experts_per_tok")):
        value = getattr(owner, attr, None)
        if isinstance(value, int):
            return value
    return None


def _embedding(model: nn.Module, prefix: str, cls: str) -> tuple[nn.Module, str]:
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            embedding = getter()
        except NotImplementedError:  # HF's base class raises this when not overridden
            embedding = None
        if isinstance(embedding, nn.Module):
            for name, module in model.named_modules(remove_duplicate=False):
                if module is embedding:
                    return embedding, name
    for path in (_join(prefix, "embed_tokens"), "embed_tokens"):
        found = _path(model, path)
        if found is not None:
            return found
    raise UnknownModelStructureError(
        f"`{cls}` has no input embedding: looked for `get_input_embeddings()`, "
        f"`{_join(prefix, 'embed_tokens')}` and `embed_tokens`."
    )
