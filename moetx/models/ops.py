"""Opaque custom ops for the MoE layer's data-dependent steps, so `torch.compile` traces a block whole.

`torch.compile` cannot trace a per-expert loop whose bounds come from the routing
(`bincount(...).tolist()` + `split`), nor `torch._C._current_graph_task_id()`. Here each step is a
`torch.library.custom_op` the compiler treats as one node with a fake (shape-only)
implementation: static output shapes, so nothing downstream depends on data.

- `grouped_swiglu(x [N, H], counts [E], gate_up [E, 2I, H], down [E, H, I]) -> [N, H]`: the routed
  experts on rows grouped by expert (`counts[e]` consecutive rows per expert), with a backward op
  that gives every expert a dense gradient (zeros for an expert that got no row). The forward is
  the same loop of matmuls `RoutedExperts` runs eagerly, so it is bitwise equal to it.
- `count_load_(load [E], top_k_index)`: adds tokens per expert to `load` unless autograd is running
  a backward pass (an activation-checkpoint recomputation), checked when the op runs, not traced.

The models call them only while compiling (`torch.compiler.is_compiling()`); eager code keeps its
plain torch ops, which dispatch modes (selective activation checkpointing) see one by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["count_load_", "grouped_swiglu", "swiglu_loop"]


def _swiglu_loop(
    x: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """Per expert e: `h = x_e @ gate_up[e].T`, `(silu(gate) * up) @ down[e].T`; outputs and h."""
    outs, pre = [], []
    for e, rows in enumerate(torch.split(x, counts.tolist())):
        h = rows @ gate_up[e].T
        gate, up = h.chunk(2, dim=-1)
        outs.append((F.silu(gate) * up) @ down[e].T)
        pre.append(h)
    return outs, pre


def swiglu_loop(x: Tensor, counts: list[int], gate_up: Tensor, down: Tensor) -> Tensor:
    """The eager routed experts: `grouped_swiglu` as plain torch ops (one matmul chain per expert).

    `counts` is a list here (the host sync happens in the caller); autograd gives each expert a
    gradient through its (possibly empty) matmuls.
    """
    outs = []
    for e, rows in enumerate(torch.split(x, counts)):
        gate, up = (rows @ gate_up[e].T).chunk(2, dim=-1)
        outs.append((F.silu(gate) * up) @ down[e].T)
    return torch.cat(outs)


@torch.library.custom_op("moetx::grouped_swiglu_fwd", mutates_args=())
def _grouped_swiglu_fwd(
    x: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor
) -> tuple[Tensor, Tensor]:
    outs, pre = _swiglu_loop(x, counts, gate_up, down)
    return torch.cat(outs), torch.cat(pre)


@_grouped_swiglu_fwd.register_fake
def _(x: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], down.shape[1]), x.new_empty(x.shape[0], gate_up.shape[1])


@torch.library.custom_op("moetx::grouped_swiglu_bwd", mutates_args=())
def _grouped_swiglu_bwd(
    grad: Tensor, x: Tensor, pre: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    sizes = counts.tolist()
    d_gate_up, d_down = torch.zeros_like(gate_up), torch.zeros_like(down)
    d_x = []
    parts = zip(grad.split(sizes), x.split(sizes), pre.split(sizes), strict=True)
    for e, (g, rows, h) in enumerate(parts):
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate)
        d_down[e] = g.T @ (act * up)
        d_hidden = g @ down[e]
        d_h = torch.cat([torch.ops.aten.silu_backward(d_hidden * up, gate), d_hidden * act], -1)
        d_gate_up[e] = d_h.T @ rows
        d_x.append(d_h @ gate_up[e])
    return torch.cat(d_x) if d_x else torch.zeros_like(x), d_gate_up, d_down


@_grouped_swiglu_bwd.register_fake
def _(
    grad: Tensor, x: Tensor, pre: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(gate_up), torch.empty_like(down)


def _setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, counts, gate_up, down = inputs
    ctx.save_for_backward(x, output[1], counts, gate_up, down)


def _backward(ctx, grad: Tensor, grad_pre: Tensor | None):  # type: ignore[no-untyped-def]
    x, pre, counts, gate_up, down = ctx.saved_tensors
    d_x, d_gate_up, d_down = _grouped_swiglu_bwd(grad.contiguous(), x, pre, counts, gate_up, down)
    return d_x, None, d_gate_up, d_down


_grouped_swiglu_fwd.register_autograd(_backward, setup_context=_setup)


def grouped_swiglu(x: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """SiLU-gated experts on rows grouped by expert, as one op the compiler does not look into.

    Args:
        x: `[N, H]` rows, expert 0's first (`counts[0]` of them), then expert 1's, ...
        counts: `[E]` int64 rows per expert, summing to N.
        gate_up: `[E, 2I, H]` stacked gate and up projections.
        down: `[E, H, I]` stacked down projections.

    Returns:
        `[N, H]`: row i is `(silu(x_i W_g^T) * x_i W_u^T) W_d^T` with its expert's weights.
        Backward gives `gate_up` and `down` dense gradients (zero rows for an idle expert).
    """
    return _grouped_swiglu_fwd(x, counts, gate_up, down)[0]


@torch.library.custom_op("moetx::count_load_", mutates_args=("load",))
def count_load_(load: Tensor, top_k_index: Tensor) -> None:
    """Add the tokens per expert in `top_k_index` to `load` [E], unless in a backward pass.

    The check runs when the op runs (also inside a compiled graph), so an activation-checkpoint
    recomputation (always inside a backward pass) never counts twice.
    """
    if torch._C._current_graph_task_id() != -1:
        return
    counts = torch.bincount(top_k_index.reshape(-1), minlength=load.numel())
    load.add_(counts[: load.numel()])


@count_load_.register_fake
def _(load: Tensor, top_k_index: Tensor) -> None:
    return None
