"""Hypothesis strategies for moetx values: passes, pipelines, synthetic MoE configs, mesh degrees.

Public so users can property-test their own passes and models the way moetx tests its own.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from moetx import (
    BUILTIN_ORDER,
    FSDP,
    ActivationCheckpoint,
    ContextParallel,
    ExpertParallel,
    MeshDegrees,
    Pass,
    Pipeline,
    TensorParallel,
)
from moetx.models import MoEConfig


def _builtin_pass_strategies(*, mixed_precision: bool = True) -> dict[str, st.SearchStrategy[Any]]:
    out: dict[str, st.SearchStrategy[Any]] = {
        "ep": st.sampled_from(
            [
                ExpertParallel(),
                ExpertParallel(dedup=True),
                ExpertParallel(dispatcher="all_gather"),
            ]
        ),
        "ac": st.builds(
            ActivationCheckpoint,
            mode=st.sampled_from(["full", "router", "selective"]),
            every=st.integers(1, 2),
        ),
        "fsdp": st.builds(
            FSDP,
            reshard_after_forward=st.sampled_from([True, False, "auto"]),
            min_unit_bytes=st.sampled_from([0, 1 << 20]),
            prefetch=st.integers(0, 2),
            param_dtype=st.sampled_from([None, "bfloat16"] if mixed_precision else [None]),
        ),
    }
    out["tp"] = st.just(TensorParallel())
    out["cp"] = st.builds(
        ContextParallel, comm=st.sampled_from(["allgather", "p2p"]), load_balance=st.booleans()
    )
    return out


def passes(*, stages: tuple[str, ...] | None = None) -> st.SearchStrategy[Pass]:
    """Any built-in pass (optionally only from `stages`), with drawn options."""
    table = _builtin_pass_strategies()
    keys = [s for s in BUILTIN_ORDER if s in table and (stages is None or s in stages)]
    return st.one_of(*(table[k] for k in keys))


@st.composite
def pipelines(
    draw: st.DrawFn,
    *,
    stages: tuple[str, ...] | None = None,
    required: tuple[str, ...] = (),
    mixed_precision: bool = True,
) -> Pipeline:
    """A valid pipeline: a subset of the built-in stages (always `required`), in order.

    `mixed_precision=False` keeps FSDP in fp32 (for parity at fp32 tolerance).
    """
    table = _builtin_pass_strategies(mixed_precision=mixed_precision)
    keys = [s for s in BUILTIN_ORDER if s in table and (stages is None or s in stages)]
    chosen = set(draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))) | set(
        required
    )
    return Pipeline([draw(table[s]) for s in BUILTIN_ORDER if s in chosen])


@st.composite
def moe_configs(draw: st.DrawFn, *, ep_degree: int = 1, **fixed: Any) -> MoEConfig:
    """Tiny synthetic MoE configs; expert counts are multiples of `ep_degree` by construction."""
    experts = ep_degree * draw(st.integers(1, 2)) * (2 if ep_degree == 1 else 1)
    heads = draw(st.sampled_from([2, 4]))
    values: dict[str, Any] = dict(
        vocab_size=32,
        hidden_size=draw(st.sampled_from([8, 16])),
        num_layers=draw(st.integers(1, 2)),
        num_heads=heads,
        num_kv_heads=draw(st.sampled_from([1, heads])),
        num_experts=experts,
        top_k=draw(st.integers(1, min(2, experts))),
        expert_hidden_size=8,
        num_shared_experts=draw(st.integers(0, 1)),
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        tie_embeddings=draw(st.booleans()),
        aux_loss_coef=draw(st.sampled_from([0.0, 0.01])),
        routing_bias=draw(st.booleans()),  # aux-loss-free balancing (bias + load counters)
    )
    # top-1 with its weight renormalised is always 1: the router's true gradient is zero and
    # what each run computes is rounding noise, which AdamW scales up to a full step (±lr) that
    # differs between runs. Top-1 routers train through the raw weight (as Switch does).
    values["norm_topk_prob"] = values["top_k"] > 1
    values.update(fixed)
    return MoEConfig(**values)


@st.composite
def mesh_degrees(draw: st.DrawFn, *, world_size: int, max_cp: int = 2) -> MeshDegrees:
    """Legal degrees for `world_size` ranks: dp_replicate, cp, ep drawn; dp_shard inferred."""
    dp_replicate = draw(st.sampled_from([d for d in (1, 2) if world_size % d == 0]))
    cp = draw(
        st.sampled_from([c for c in range(1, max_cp + 1) if (world_size // dp_replicate) % c == 0])
    )
    dp_shard = world_size // (dp_replicate * cp)
    ep = draw(st.sampled_from([e for e in (1, 2, 4, 8) if (dp_shard * cp) % e == 0]))
    return MeshDegrees(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, ep=ep)
