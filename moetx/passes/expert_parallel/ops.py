"""The dispatchers' data-dependent steps, each eager or as an opaque custom op under `torch.compile`.

Token dispatch has sizes only the data knows: how many rows a rank receives (uneven all-to-all
splits, all-gather padding) and which rows are its own. The compiler cannot trace `.tolist()`
split sizes or `nonzero`, so under `torch.compile` (`torch.compiler.is_compiling()`) each such
step is a `torch.library.custom_op`: the compiler sees one node whose fake implementation gives
the data-dependent row count as a fresh unbacked size, and `register_autograd` gives the
collectives their backward (the reverse collective, itself an op). Eagerly the same functions run
the `_functional_collectives` calls as before, so eager numerics and collective counts (visible
to dispatch modes such as selective activation checkpointing) do not change.

Functions (each rank of the group calls each with its own data):

- `all_to_all(x, output_splits, input_splits, group_name)`: uneven all-to-all of rows, with
  autograd; splits are lists (eager) or `[D]` int64 tensors (compiling).
- `gather_padded(x, counts, fill, group_name)`: every rank's rows, each block padded with `fill` to
  the largest count, `[D * max(counts), ...]`, with autograd (backward: `scatter_padded`).
- `scatter_padded(x, counts, rows, group_name)`: reduce-scatter (sum) of `[D * max(counts), ...]`,
  this rank's first `rows` rows, with autograd (backward: `gather_padded`).
- `receive_layout(recv_grid)`, `select_local(ids, first, count)`: the index vectors the
  all-to-all and all-gather dispatchers build from received counts or gathered expert ids.
- `column_nonzero(mask)`: the `True` entries of a 2-D mask in column-major order (the deduplicating
  dispatcher's (rank, token) pairs and (expert, row) copies).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import _functional_collectives as funcol
from torch.distributed.distributed_c10d import GroupName

__all__ = [
    "all_to_all",
    "column_nonzero",
    "gather_padded",
    "receive_layout",
    "scatter_padded",
    "select_local",
]

_c10d = torch.ops._c10d_functional


def _dynamic_rows() -> Any:
    """A fresh unbacked SymInt (>= 0) for a data-dependent row count, in a fake implementation.

    `ctx.new_dynamic_size()` refuses when dynamo was not asked to capture dynamic output shapes
    (`fullgraph=False` without `capture_dynamic_output_shape_ops`); the rows here are valid by
    construction, so fall back to the shape environment directly, as torch's own device-mesh op
    `_runtime_compute_coordinate_on_dim` does.
    """
    ctx = torch.library.get_ctx()
    shape_env = ctx._shape_env
    if shape_env is None or shape_env.allow_dynamic_output_shape_ops:
        return ctx.new_dynamic_size()
    return torch._library.fake_impl.allocate_size(shape_env)


# --------------------------------------------------------------------------------- all-to-all


@torch.library.custom_op("moetx::ep_all_to_all", mutates_args=())
def _all_to_all_op(
    x: Tensor, output_splits: Tensor, input_splits: Tensor, group_name: str, out_rows: int | None
) -> Tensor:
    out = _c10d.all_to_all_single(
        x.contiguous(), output_splits.tolist(), input_splits.tolist(), group_name
    )
    return _c10d.wait_tensor(out)


@_all_to_all_op.register_fake
def _(
    x: Tensor, output_splits: Tensor, input_splits: Tensor, group_name: str, out_rows: int | None
) -> Tensor:
    rows = _dynamic_rows() if out_rows is None else out_rows
    return x.new_empty((rows, *x.shape[1:]))


def _all_to_all_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, output_splits, input_splits, group_name, _ = inputs
    ctx.save_for_backward(output_splits, input_splits)
    ctx.group_name, ctx.rows = group_name, x.shape[0]


def _all_to_all_backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def]
    output_splits, input_splits = ctx.saved_tensors
    back = _all_to_all_op(grad, input_splits, output_splits, ctx.group_name, ctx.rows)
    return back, None, None, None, None


_all_to_all_op.register_autograd(_all_to_all_backward, setup_context=_all_to_all_setup)


def all_to_all(
    x: Tensor,
    output_splits: Tensor | list[int],
    input_splits: Tensor | list[int],
    group_name: GroupName,
    out_rows: Any = None,
) -> Tensor:
    """Uneven all-to-all of the rows of `x` (autograd: the reverse all-to-all).

    Args:
        x: `[sum(input_splits), ...]` rows, grouped by destination rank.
        output_splits: Rows this rank receives from each rank: a list, or a `[D]` int64 tensor
            (which must be one while compiling).
        input_splits: Rows this rank sends to each rank, likewise.
        group_name: The process group's name.
        out_rows: `sum(output_splits)` when the caller knows it as a size (compiling: the row
            count of a tensor the result must line up with); None: a fresh size.

    Returns:
        `[sum(output_splits), ...]`, grouped by source rank.
    """
    if torch.compiler.is_compiling():
        assert isinstance(output_splits, Tensor) and isinstance(input_splits, Tensor)
        return _all_to_all_op(x, output_splits, input_splits, group_name, out_rows)
    out_list = output_splits if isinstance(output_splits, list) else output_splits.tolist()
    in_list = input_splits if isinstance(input_splits, list) else input_splits.tolist()
    return funcol.all_to_all_single_autograd(x, out_list, in_list, group_name)


def _receive_layout_eager(recv_grid: Tensor) -> tuple[Tensor, Tensor]:
    d, local_e = recv_grid.shape
    # Local expert id of every received row, in received order; a stable sort groups the rows
    # by expert and keeps source-rank order inside each group.
    expert_of_row = torch.arange(local_e, device=recv_grid.device).repeat(d)
    expert_of_row = expert_of_row.repeat_interleave(recv_grid.reshape(-1))
    permutation = torch.argsort(expert_of_row, stable=True)
    return expert_of_row[permutation], permutation


@torch.library.custom_op("moetx::ep_receive_layout", mutates_args=())
def _receive_layout_op(recv_grid: Tensor) -> tuple[Tensor, Tensor]:
    return _receive_layout_eager(recv_grid)


@_receive_layout_op.register_fake
def _(recv_grid: Tensor) -> tuple[Tensor, Tensor]:
    rows = _dynamic_rows()
    return recv_grid.new_empty(rows), recv_grid.new_empty(rows)


def receive_layout(recv_grid: Tensor) -> tuple[Tensor, Tensor]:
    """`(expert_ids [N], permutation [N])` for the rows an all-to-all delivered.

    Args:
        recv_grid: `[D, E/D]` int64: rows received from each source rank for each local expert.

    Returns:
        The local expert id of each row after the permutation (non-decreasing), and the
        permutation from received order (`[src rank][expert]`) to expert-major order.
    """
    if torch.compiler.is_compiling():
        return _receive_layout_op(recv_grid)  # type: ignore[no-any-return]
    return _receive_layout_eager(recv_grid)


# --------------------------------------------------------------------------------- all-gather


def _pad_rows(x: Tensor, rows: int, fill: float) -> Tensor:
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]), value=fill)


@torch.library.custom_op("moetx::ep_gather_padded", mutates_args=())
def _gather_padded_op(
    x: Tensor, counts: Tensor, fill: float, group_name: str, out_rows: int | None
) -> Tensor:
    padded = _pad_rows(x, int(counts.max()), fill)
    out = _c10d.all_gather_into_tensor(padded, counts.numel(), group_name)
    return _c10d.wait_tensor(out)


@_gather_padded_op.register_fake
def _(x: Tensor, counts: Tensor, fill: float, group_name: str, out_rows: int | None) -> Tensor:
    rows = _dynamic_rows() if out_rows is None else out_rows
    return x.new_empty((rows, *x.shape[1:]))


@torch.library.custom_op("moetx::ep_scatter_padded", mutates_args=())
def _scatter_padded_op(x: Tensor, counts: Tensor, rows: int, group_name: str) -> Tensor:
    out = _c10d.wait_tensor(_c10d.reduce_scatter_tensor(x, "sum", counts.numel(), group_name))
    return out[:rows].clone()


@_scatter_padded_op.register_fake
def _(x: Tensor, counts: Tensor, rows: int, group_name: str) -> Tensor:
    return x.new_empty((rows, *x.shape[1:]))


def _gather_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, counts, _, group_name, _ = inputs
    ctx.save_for_backward(counts)
    ctx.group_name, ctx.rows = group_name, x.shape[0]


def _gather_backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def]
    (counts,) = ctx.saved_tensors
    back = _scatter_padded_op(grad.contiguous(), counts, ctx.rows, ctx.group_name)
    return back, None, None, None, None


def _scatter_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, counts, _, group_name = inputs
    ctx.save_for_backward(counts)
    ctx.group_name, ctx.rows = group_name, x.shape[0]


def _scatter_backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def]
    (counts,) = ctx.saved_tensors
    back = _gather_padded_op(grad.contiguous(), counts, 0.0, ctx.group_name, ctx.rows)
    return back, None, None, None


_gather_padded_op.register_autograd(_gather_backward, setup_context=_gather_setup)
_scatter_padded_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def gather_padded(
    x: Tensor, counts: Tensor, fill: float, group_name: GroupName, most: int | None = None
) -> Tensor:
    """Every rank's rows of `x`, each rank's block padded with `fill` to `max(counts)` rows.

    Args:
        x: `[counts[rank], ...]` this rank's rows.
        counts: `[D]` int64, every rank's row count.
        fill: Value of the padding rows.
        group_name: The process group's name.
        most: `max(counts)` when the caller already read it (eager: one host sync per dispatch,
            not one per gather); None reads it here.

    Returns:
        `[D * max(counts), ...]`; autograd: the reduce-scatter (sum) of the gradient.
    """
    if torch.compiler.is_compiling():
        return _gather_padded_op(x, counts, fill, group_name, None)
    rows = int(counts.max()) if most is None else most
    return funcol.all_gather_single_autograd(_pad_rows(x, rows, fill), 0, group_name)


def scatter_padded(x: Tensor, counts: Tensor, rows: int, group_name: GroupName) -> Tensor:
    """Sum `x` `[D * max(counts), ...]` over the group; this rank's block, first `rows` rows.

    Autograd: the gradient padded to `max(counts)` rows and all-gathered.
    """
    if torch.compiler.is_compiling():
        return _scatter_padded_op(x, counts, rows, group_name)
    return funcol.reduce_scatter_single_autograd(x, "sum", 0, group_name)[:rows]


def _select_local_eager(ids: Tensor, first: int, count: int) -> tuple[Tensor, Tensor]:
    flat = ids.reshape(-1)
    mine = ((flat >= first) & (flat < first + count)).nonzero().squeeze(1)
    local_ids = flat[mine] - first
    order = torch.argsort(local_ids, stable=True)
    return mine[order], local_ids[order]


@torch.library.custom_op("moetx::ep_select_local", mutates_args=())
def _select_local_op(ids: Tensor, first: int, count: int) -> tuple[Tensor, Tensor]:
    return _select_local_eager(ids, first, count)


@_select_local_op.register_fake
def _(ids: Tensor, first: int, count: int) -> tuple[Tensor, Tensor]:
    rows = _dynamic_rows()
    return ids.new_empty(rows), ids.new_empty(rows)


def select_local(ids: Tensor, first: int, count: int) -> tuple[Tensor, Tensor]:
    """The copies routed to experts `[first, first + count)`, grouped by expert.

    Args:
        ids: `[R, k]` global expert id of each copy (-1 for padding rows).
        first: This rank's first global expert.
        count: Experts on this rank.

    Returns:
        `(copies [N], local_ids [N])`: flat indices into `ids` of this rank's copies, sorted by
        local expert id (stable, so in gathered order within an expert), and those local ids.
    """
    if torch.compiler.is_compiling():
        return _select_local_op(ids, first, count)  # type: ignore[no-any-return]
    return _select_local_eager(ids, first, count)


# --------------------------------------------------------------------------------- dedup


def _column_nonzero_eager(mask: Tensor) -> tuple[Tensor, Tensor]:
    found = mask.t().nonzero()
    return found[:, 0], found[:, 1]


@torch.library.custom_op("moetx::ep_column_nonzero", mutates_args=())
def _column_nonzero_op(mask: Tensor) -> tuple[Tensor, Tensor]:
    cols, rows = _column_nonzero_eager(mask)
    return cols.clone(), rows.clone()  # a custom op's outputs may not be views of one tensor


@_column_nonzero_op.register_fake
def _(mask: Tensor) -> tuple[Tensor, Tensor]:
    rows = _dynamic_rows()
    return mask.new_empty(rows, dtype=torch.int64), mask.new_empty(rows, dtype=torch.int64)


def column_nonzero(mask: Tensor) -> tuple[Tensor, Tensor]:
    """`(cols [N], rows [N])` of the `True` entries of the 2-D bool `mask`, column-major.

    Sorted by column, then by row: for a `[T, D]` (token, rank) mask, the pairs grouped by rank
    in token order; for a `[R, E/D]` (row, local expert) mask, the copies grouped by expert in
    row order.
    """
    if torch.compiler.is_compiling():
        return _column_nonzero_op(mask)  # type: ignore[no-any-return]
    return _column_nonzero_eager(mask)
