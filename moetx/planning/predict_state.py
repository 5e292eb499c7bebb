"""Per-rank parameter, gradient and AdamW bytes, and FSDP2's units, from shapes alone.

`Pipeline.plan` applies a pipeline on `meta` and reads the placements back: exact, but seconds
per candidate at DeepSeek-V3 scale. The auto-planner needs thousands of candidates, so this module
reads the model once (`ModelShapes`: every parameter's shape, dtype and role) and applies the
placement rules the passes use, with DTensor's and FSDP2's chunking (`torch.chunk`: the first
ranks hold `ceil(n / w)` rows, padded so to every rank in the all-gather buffers):

- dense parameters: FSDP-sharded on dim 0 over `dp_shard × cp` (replicated over dp_replicate);
- routed experts under `ExpertParallel`: `E / ep` experts per rank, then FSDP-sharded over
  `dp_replicate × ep_shard` on dim 0, or on dim 1 when the shards outnumber the local experts.

Tests check the numbers against `plan` (which real gloo ranks check) on drawn meshes.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterator

import attrs
import torch
from torch import nn

from moetx.core.algebra import Pass, Pipeline
from moetx.core.errors import PassPreconditionError
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import MoEConfig, MoETransformer
from moetx.passes.tensor_parallel.targets import tp_targets
from moetx.planning.report import RankBytes
from moetx.structure.discovery import ModelStructure, discover
from moetx.structure.hf import hf_model_type

__all__ = [
    "ModelShapes",
    "ParamInfo",
    "TPLayout",
    "find_pass",
    "local_shape",
    "state_bytes",
    "uses_tp",
]

#: Roles a parameter can have, innermost FSDP unit first.
ROLES = ("expert", "router", "block", "embedding", "lm_head", "root")


@attrs.frozen
class ParamInfo:
    """One parameter, as the planner needs it."""

    fqn: str
    shape: tuple[int, ...]
    itemsize: int
    trainable: bool
    role: str  # one of ROLES
    block: int  # index in `discover(model).blocks`, -1 outside blocks
    tp_dim: int | None = None  # the dim `TensorParallel` shards (None: replicated over tp)


@attrs.frozen
class TPLayout:
    """What `TensorParallel` would do to a model, at any degree that divides `sizes`.

    Attributes:
        sizes: Sizes every tp degree must divide (heads, kv heads, MLP inner sizes, vocabulary).
        refused: Why TP cannot apply to this model at all ("" when it can).
        block_calls: Per block, the activation all-reduces over tp (forward: one per row-wise
            layer's output; backward: one per column-wise layer's input gradient).
        outside_calls: The same outside blocks (the vocabulary-parallel embedding in forward,
            the lm head's input gradient in backward).
        logits: The vocabulary the lm head's logits are all-gathered over (0: not sharded).
        grad_widths: Per block, the widths of its backward all-reduces summed: each column-wise
            layer's input (the hidden size, or a latent attention's `q_lora_rank` /
            `kv_lora_rank`) and a latent attention's shared rotary key (`latent`: one more
            backward call). Forward all-reduces are all hidden-size wide.
    """

    sizes: tuple[int, ...] = ()
    refused: str = ""
    block_calls: tuple[tuple[int, int], ...] = ()
    grad_widths: tuple[int, ...] = ()
    outside_calls: tuple[int, int] = (0, 0)
    logits: int = 0


@attrs.frozen
class ModelShapes:
    """Everything about a model the predictors read: parameters, routing and attention shapes.

    Build with `ModelShapes.of(model_or_config)` (the model is built on, or copied to, nothing:
    only `named_parameters` and `discover` are read).
    """

    params: tuple[ParamInfo, ...]
    num_blocks: int
    moe_blocks: tuple[int, ...]
    mtp_blocks: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    kv_heads: int
    head_dim: int
    compute_itemsize: int
    tied_embeddings: bool
    routing_bias: bool
    config: MoEConfig | None = attrs.field(default=None, eq=False)
    #: Bytes of each routing-load counter buffer (one entry per MoE layer and buffer): what
    #: `moetx.passes.load_sync` all-reduces each forward.
    counters: tuple[int, ...] = ()
    #: Blocks whose MoE layer has a nonzero aux loss and a `stats_reducer` hook (moetx's
    #: `MoEBlock`): their statistics are summed over cp under `ContextParallel`.
    aux_blocks: tuple[int, ...] = ()
    #: A Hugging Face transformers model (`ContextParallel` checks its batches over the world).
    hf: bool = False
    #: An HF model returning a router aux loss (`output_router_logits` and a
    #: `router_aux_loss_coef`; not DeepSeek-V3), which `ContextParallel` reduces over cp (`hf_aux`).
    router_aux: bool = False
    tp: TPLayout = attrs.field(factory=lambda: TPLayout(refused="not read"))
    #: Results the predictors derive from these shapes, keyed by what they depend on (the
    #: planner asks for the same FSDP units thousands of times).
    cache: dict[object, object] = attrs.field(factory=dict, eq=False, repr=False, init=False)
    #: `params` with identical (shape, itemsize, trainable, role) counted once: what the
    #: byte counts need (DeepSeek-V3 has ~1000 parameters but ~30 distinct ones).
    grouped: tuple[tuple[ParamInfo, int], ...] = attrs.field(default=(), eq=False)

    def __attrs_post_init__(self) -> None:
        counts: dict[tuple[object, ...], list[object]] = {}
        for p in self.params:
            key = (p.shape, p.itemsize, p.trainable, p.role, p.tp_dim)
            counts.setdefault(key, [p, 0])[1] += 1  # type: ignore[operator]
        object.__setattr__(self, "grouped", tuple((p, n) for p, n in counts.values()))

    @classmethod
    def of(cls, model: nn.Module | MoEConfig) -> ModelShapes:
        """Read the shapes of `model` (a module, any device) or of the model a config builds."""
        config = model if isinstance(model, MoEConfig) else None
        if isinstance(model, MoEConfig):
            with torch.device("meta"):
                model = MoETransformer(model)
        s = discover(model)
        role: dict[int, tuple[str, int]] = {}
        for i, b in enumerate(s.blocks):
            for p in b.module.parameters():
                role.setdefault(id(p), ("block", i))
            if b.moe is not None:
                for p in b.moe.router.parameters():
                    role[id(p)] = ("router", i)
                for p in b.moe.experts.parameters():
                    role[id(p)] = ("expert", i)
        if not s.tied_embeddings:
            for name, mod in (("embedding", s.embedding), ("lm_head", s.lm_head)):
                for p in mod.parameters() if mod is not None else ():
                    role.setdefault(id(p), (name, -1))
        tp_dims, tp = _tp_layout(model, s)
        params = tuple(
            ParamInfo(
                n,
                tuple(p.shape),
                p.element_size(),
                p.requires_grad,
                *role.get(id(p), ("root", -1)),
                tp_dim=tp_dims.get(id(p)),
            )
            for n, p in model.named_parameters()
        )
        moe = [i for i, b in enumerate(s.blocks) if b.moe is not None]
        first = s.blocks[moe[0]].moe if moe else None
        attn = s.blocks[0].attention
        kv_heads, head_dim = _kv_layout(attn)
        dtype = next(p.dtype for p in model.parameters())
        layers = [(i, b.moe) for i, b in enumerate(s.blocks) if b.moe is not None]
        buffers = [(m.module, n) for _, m in layers for n in m.counter_buffer_names]
        hf = hf_model_type(model) is not None
        config_logits = getattr(getattr(model, "config", None), "output_router_logits", False)
        logits = hf and bool(config_logits)
        return cls(
            params=params,
            num_blocks=len(s.blocks),
            moe_blocks=tuple(moe),
            mtp_blocks=tuple(i for i, b in enumerate(s.blocks) if b.is_mtp),
            num_experts=first.num_experts if first else 0,
            top_k=first.top_k if first else 0,
            hidden_size=int(typing.cast(torch.Tensor, s.embedding.weight).shape[1]),
            kv_heads=kv_heads,
            head_dim=head_dim,
            compute_itemsize=torch.empty((), dtype=dtype).element_size(),
            tied_embeddings=s.tied_embeddings,
            routing_bias=bool(first is not None and first.counter_buffer_names),
            config=config,
            counters=tuple(
                m.get_buffer(n).numel() * m.get_buffer(n).element_size() for m, n in buffers
            ),
            aux_blocks=tuple(
                i
                for i, m in layers
                if m.stats_reducer_attr is not None and getattr(m.module, "aux_loss_coef", 0.0) != 0
            ),
            hf=hf,
            router_aux=logits and hasattr(model, "router_aux_loss_coef"),
            tp=tp,
        )

    def tp_legal(self, degree: int) -> bool:
        """Whether `TensorParallel` can shard this model over `degree` ranks."""
        return degree == 1 or (not self.tp.refused and all(n % degree == 0 for n in self.tp.sizes))

    @property
    def num_parameters(self) -> int:
        """Parameter count (tied parameters once)."""
        return sum(math.prod(p.shape) for p in self.params)


def _kv_layout(attn: nn.Module) -> tuple[int, int]:
    """(K/V heads, head dim) of the K/V that context parallelism gathers: moetx's attention
    (`num_kv_heads`), HF's (`config.num_key_value_heads`), or HF latent attention, whose K/V
    reach the kernel per query head, padded to one width (`context_parallel.hf`)."""
    if hasattr(attn, "kv_lora_rank"):
        width = max(int(getattr(attn, "qk_head_dim", 1)), int(getattr(attn, "v_head_dim", 1)))
        return int(getattr(attn, "num_heads", 1)), width
    config = getattr(attn, "config", None)
    heads = getattr(attn, "num_kv_heads", getattr(config, "num_key_value_heads", 1))
    return int(heads), int(getattr(attn, "head_dim", 1))


def _tp_layout(model: nn.Module, s: ModelStructure) -> tuple[dict[int, int], TPLayout]:
    """(parameter id -> the dim TP shards, the layout) from `tp_targets`."""
    try:
        targets = tp_targets(model, 1)
    except PassPreconditionError as e:
        return {}, TPLayout(refused=str(e).splitlines()[0])
    dims: dict[int, int] = {}
    sizes: set[int] = set()
    calls = [[0, 0] for _ in s.blocks]
    widths = [0 for _ in s.blocks]
    outside = [0, 0]
    logits = 0
    for t in targets:
        if t.kind in ("embedding", "lm_head"):  # vocabulary-parallel: rows of both
            for p in t.module.parameters():
                dims[id(p)] = 0
            sizes.add(_weight(t.module).shape[0])
            if t.kind == "embedding":
                outside[0] += 1  # the partial lookups summed
            else:
                outside[1] += 1  # the input's gradient summed
                logits = _weight(t.module).shape[0]
            continue
        block = next(i for i, b in enumerate(s.blocks) if t.fqn.startswith(f"{b.fqn}."))
        calls[block][0] += len(t.rowwise)  # each row-wise output summed in forward
        calls[block][1] += len(t.colwise)  # each column-wise input's gradient in backward
        for name in t.colwise:
            widths[block] += int(_weight(t.module.get_submodule(name)).shape[1])
            for p in t.module.get_submodule(name).parameters():
                dims[id(p)] = 0
                sizes.add(int(p.shape[0]))
        for name in t.rowwise:
            w = _weight(t.module.get_submodule(name))
            dims[id(w)] = 1
            sizes.add(int(w.shape[1]))
        if t.kind == "attention":
            head_dim = int(t.module.head_dim)  # type: ignore[arg-type]
            for name in ("q_proj", "k_proj"):
                sizes.add(_weight(t.module.get_submodule(name)).shape[0] // head_dim)
        elif t.kind == "latent_attention":
            sizes.add(int(t.module.num_heads))  # type: ignore[arg-type]
            # `tensor_parallel.latent`: the shared rotary key's gradient, summed in backward
            calls[block][1] += 1
            key = _weight(t.module.get_submodule("kv_a_proj_with_mqa")).shape[0]
            widths[block] += int(key) - int(t.module.kv_lora_rank)  # type: ignore[arg-type]
        if t.per_head:
            return {}, TPLayout(refused=f"`{t.fqn}` has per-head norms (not modelled)")
    layout = TPLayout(
        sizes=tuple(sorted(sizes)),
        block_calls=tuple((f, b) for f, b in calls),
        grad_widths=tuple(widths),
        outside_calls=(outside[0], outside[1]),
        logits=logits,
    )
    return dims, layout


def _weight(module: nn.Module) -> torch.Tensor:
    return typing.cast(torch.Tensor, module.weight)


def find_pass(pipeline: Pipeline, stage: str) -> Pass | None:
    """The pass of `pipeline` at `stage`, or None."""
    return next((p for p in pipeline if p.placement.stage == stage), None)


def uses_tp(pipeline: Pipeline, degrees: MeshDegrees) -> bool:
    """Whether `TensorParallel` shards anything (in the pipeline, tp degree above 1)."""
    return degrees.tp > 1 and find_pass(pipeline, "tp") is not None


def _chunk(n: int, w: int, index: int = 0) -> int:
    """Rows of `n` that coordinate `index` of `w` holds under `torch.chunk` (DTensor, FSDP2)."""
    size = -(-n // w)
    return max(0, min(size, n - index * size))


def local_shape(
    p: ParamInfo, d: MeshDegrees, ep: bool, fsdp: bool, tp: bool = False
) -> tuple[tuple[int, ...], int]:
    """Rank 0's local shape of `p`, and its padded FSDP shard numel (0 without FSDP).

    `tp`: `TensorParallel` applies (degree `d.tp`): it splits `p.tp_dim` first, and FSDP2
    shards that local tensor further on dim 0 (`_StridedShard` when both are dim 0).
    """
    shape = list(p.shape)
    if tp and p.tp_dim is not None:
        shape[p.tp_dim] //= d.tp
    if p.role == "expert" and ep:
        shape[0] //= d.ep
        if not fsdp:
            return tuple(shape), 0
        w = d.dp_replicate * d.ep_shard
        dim = 0 if len(shape) == 1 or shape[0] % w == 0 else 1
    elif fsdp:
        w, dim = d.dp_shard_cp, 0
    else:
        return tuple(shape), 0
    padded = list(shape)
    padded[dim] = -(-shape[dim] // w)
    shape[dim] = _chunk(shape[dim], w)
    return tuple(shape), math.prod(padded)


def state_bytes(shapes: ModelShapes, degrees: MeshDegrees, pipeline: Pipeline) -> RankBytes:
    """Rank 0's parameter, gradient and AdamW bytes (the largest rank: it holds full chunks)."""
    ep = find_pass(pipeline, "ep") is not None and degrees.ep > 1
    fsdp = find_pass(pipeline, "fsdp") is not None
    tp = uses_tp(pipeline, degrees)
    params = trained = grads = 0
    for p, count in shapes.grouped:
        local, _ = local_shape(p, degrees, ep, fsdp, tp)
        n = count * math.prod(local) * p.itemsize
        params += n
        trained += n if p.trainable else 0
        # Without FSDP (which reduce-scatters into the shard), DTensor's embedding backward
        # leaves the vocabulary-parallel table's gradient whole (Replicate) on every tp rank.
        whole = tp and not fsdp and p.role == "embedding" and p.tp_dim is not None
        grads += (count * math.prod(p.shape) * p.itemsize if whole else n) if p.trainable else 0
    return RankBytes(params, grads, 2 * trained)


def iter_blocks(shapes: ModelShapes) -> Iterator[tuple[int, str]]:
    """(block index, kind) with kind `dense`, `moe` or `mtp` (an MTP block, MoE or dense)."""
    for i in range(shapes.num_blocks):
        yield i, "mtp" if i in shapes.mtp_blocks else "moe" if i in shapes.moe_blocks else "dense"
