"""What `TensorParallel` shards in a model, and every reason it cannot, found before any change.

The structure module finds blocks, attention, MoE layers, embeddings and the lm head; this module
turns them into targets (a module and the children to shard column- or row-wise) and checks each
rule (linears where expected, head and size divisibility), collecting every problem so one error
lists them all.
"""

from __future__ import annotations

import attrs
from torch import nn

from moetx.core.errors import PassPreconditionError
from moetx.structure.discovery import Block, ModelStructure, discover

__all__ = ["TPTarget", "tp_targets"]

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# Children of an attention module that hold no per-head state TP would have to split:
# Qwen3's q/k norms act on head_dim (one weight shared by every head), moetx's `core` is the
# kernel (no parameters).
_REPLICATED_CHILDREN = ("q_norm", "k_norm", "core")


@attrs.frozen(eq=False)
class TPTarget:
    """One module TP transforms.

    Attributes:
        fqn: Its FQN.
        module: The module.
        kind: `"attention"`, `"mlp"` (a dense block's), `"shared_mlp"` (an MoE block's shared
            experts), `"embedding"` or `"lm_head"`.
        colwise: Children sharded column-wise (output features).
        rowwise: Children sharded row-wise (input features).
        local_attrs: `(attribute, per-rank value)` pairs to set on `module` (head counts that
            moetx's attention reads in `view`; HF attention infers them with `-1`).
        per_head: Children applied to each head's `[B, S, heads, head_dim]` slice (Qwen3's
            q/k norms): their weights become tp-replicated DTensors fed head-sharded inputs, so
            their gradients are summed over the tp ranks' heads.
    """

    fqn: str
    module: nn.Module
    kind: str
    colwise: tuple[str, ...] = ()
    rowwise: tuple[str, ...] = ()
    local_attrs: tuple[tuple[str, int], ...] = ()
    per_head: tuple[str, ...] = ()


def tp_targets(model: nn.Module, degree: int) -> list[TPTarget]:
    """Every module to shard at `degree`; raises `PassPreconditionError` listing every problem."""
    s = discover(model)
    targets: list[TPTarget] = []
    problems: list[str] = []
    for block in s.blocks:
        targets += _attention(block, degree, problems)
        kind = "shared_mlp" if block.moe is not None else "mlp"
        for fqn, mlp in _mlps(block):
            targets += _mlp(fqn, mlp, kind, degree, problems)
    targets += _vocabulary(s, degree, problems)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise PassPreconditionError(
            f"`TensorParallel` cannot shard {type(model).__name__} over tp={degree}:\n{listed}\n"
            "  fix: pick a tp degree that divides these sizes, or leave TensorParallel out."
        )
    return targets


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _attention(block: Block, degree: int, problems: list[str]) -> list[TPTarget]:
    attn, fqn = block.attention, block.attention_fqn
    projs = {n: _linear(attn, n) for n in _ATTENTION}
    head_dim = getattr(attn, "head_dim", None)
    if any(p is None for p in projs.values()) or not isinstance(head_dim, int):
        problems.append(
            f"`{fqn}` (`{type(attn).__name__}`) is not q/k/v/o_proj linears with a `head_dim` "
            "(e.g. DeepSeek-V3's latent attention); TP does not know how to split its heads"
        )
        return []
    extra = [n for n, _ in attn.named_parameters(recurse=False)]
    extra += [
        n
        for n, child in attn.named_children()
        if n not in (*_ATTENTION, *_REPLICATED_CHILDREN) and any(True for _ in child.parameters())
    ]
    if extra:
        problems.append(
            f"`{fqn}` holds parameters TP would have to split by head: {extra} "
            "(e.g. gpt-oss attention sinks)"
        )
    q, k = projs["q_proj"], projs["k_proj"]
    assert q is not None and k is not None
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    if heads % degree or kv_heads % degree:
        problems.append(
            f"`{fqn}` has {heads} query heads and {kv_heads} key/value heads; both must be "
            f"divisible by tp ({degree}) (kv heads are not replicated to reach tp)"
        )
        return []
    local = tuple(
        (name, total // degree)
        for name, total in (("num_heads", heads), ("num_kv_heads", kv_heads))
        if isinstance(getattr(attn, name, None), int)
    )
    per_head = tuple(
        n
        for n in ("q_norm", "k_norm")
        if isinstance(getattr(attn, n, None), nn.Module)
        and any(True for _ in getattr(attn, n).parameters())
    )
    colwise, rowwise = ("q_proj", "k_proj", "v_proj"), ("o_proj",)
    return [TPTarget(fqn, attn, "attention", colwise, rowwise, local, per_head)]


def _mlps(block: Block) -> list[tuple[str, nn.Module]]:
    if block.moe is not None:
        shared = block.moe.shared_experts
        return [] if shared is None else [(str(block.moe.shared_experts_fqn), shared)]
    mlp = getattr(block.module, "mlp", None)
    return [] if mlp is None else [(f"{block.fqn}.mlp", mlp)]


def _mlp(fqn: str, mlp: nn.Module, kind: str, degree: int, problems: list[str]) -> list[TPTarget]:
    gate, up, down = (_linear(mlp, n) for n in _MLP)
    if gate is None or up is None or down is None:
        problems.append(
            f"`{fqn}` (`{type(mlp).__name__}`) is not gate/up/down_proj linears; TP does not "
            "know how to split it"
        )
        return []
    if gate.out_features % degree:
        problems.append(
            f"`{fqn}` has inner size {gate.out_features}, not divisible by tp ({degree})"
        )
        return []
    return [TPTarget(fqn, mlp, kind, ("gate_proj", "up_proj"), ("down_proj",))]


def _vocabulary(s: ModelStructure, degree: int, problems: list[str]) -> list[TPTarget]:
    if s.tied_embeddings:
        return []  # one weight, two layouts: stays replicated (see TensorParallel)
    out: list[TPTarget] = []
    emb = s.embedding
    if isinstance(emb, nn.Embedding):
        if emb.num_embeddings % degree:
            problems.append(
                f"`{s.embedding_fqn}` has a vocabulary of {emb.num_embeddings}, not divisible "
                f"by tp ({degree})"
            )
        else:
            out.append(TPTarget(s.embedding_fqn, emb, "embedding"))
    head = s.lm_head
    if isinstance(head, nn.Linear) and s.lm_head_fqn is not None:
        if head.out_features % degree:
            problems.append(
                f"`{s.lm_head_fqn}` has {head.out_features} outputs, not divisible by tp ({degree})"
            )
        else:
            out.append(TPTarget(s.lm_head_fqn, head, "lm_head"))
    return out
