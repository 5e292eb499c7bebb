"""Gather full gradients and parameters by original name, and compare them with a readable report.

A parity test runs the same model and batch once in the parent (the reference) and once on real
ranks with a pipeline applied, then compares. The intended pattern:

    # moetx/testing/<bodies>.py: rank bodies are module-level functions the ranks can import.
    def ep_step(seed: int, degree: int) -> dict[str, object]:
        model = build_model(seed)                      # same seed, same init on every rank
        mesh = cached(("ep", degree), lambda: make_mesh(degree))
        model = ExpertParallel(degree=degree).apply(model, mesh)
        loss = model(batch(seed)).mean()
        loss.backward()
        return {"loss": full_tensor(loss), "grads": gradients(model), "params": parameters(model)}

    # tests/...: the parent builds the reference and asserts; ranks never assert.
    def test_ep_matches_one_process(pool2):
        ref = build_model(0)
        loss = ref(batch(0)).mean()
        loss.backward()
        expected = {"loss": loss, "grads": gradients(ref), "params": parameters(ref)}
        for rank, actual in enumerate(pool2.run(ep_step, 0, 2)):
            compare(expected, actual, what=f"rank {rank} results")

`gradients` and `parameters` call `full_tensor` on DTensors, a collective: every rank must call them
on the same model structure, in the same order. Names are the model's *original* FQNs: prefixes
that wrappers insert (`checkpoint_wrapper`, FSDP1, `torch.compile`) are removed, so wrapped and
unwrapped models compare key by key.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.fsdp._common_utils import FSDP_PREFIX
from torch.distributed.tensor import DTensor

__all__ = [
    "ModelSnapshot",
    "clean_fqn",
    "compare",
    "full_tensor",
    "gradients",
    "missing_gradients",
    "parameters",
    "snapshot",
]

# torch.compile's OptimizedModule stores the module as `_orig_mod`; torch has no constant for it.
_COMPILE_PREFIX = "_orig_mod."
WRAPPER_PREFIXES = (_CHECKPOINT_PREFIX, FSDP_PREFIX, _COMPILE_PREFIX)
_MAX_ROWS = 30


def clean_fqn(name: str) -> str:
    """Remove the prefixes that torch wrappers insert into a parameter's FQN.

    Example:
        >>> clean_fqn("layers.0._checkpoint_wrapped_module.moe.w1")
        'layers.0.moe.w1'
    """
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """Return `t` as a plain, detached CPU copy; a DTensor is gathered first (a collective)."""
    with torch.no_grad():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        return t.detach().to("cpu", copy=True)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the full gradient of every parameter that requires grad, by original FQN.

    A missing gradient (`None`) comes back as zeros of the parameter's full shape, so keys always
    match the reference; `missing_gradients` says which ones were missing. For a DTensor parameter
    the zeros are gathered like a real gradient, so ranks stay in step even if only some of them
    lack the gradient.
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        grad = p.grad
        if grad is None:
            grad = torch.zeros_like(p) if isinstance(p, DTensor) else torch.zeros(p.shape)
            grad = grad.to(p.dtype)
        out[clean_fqn(name)] = full_tensor(grad)
    return out


def missing_gradients(model: nn.Module) -> list[str]:
    """Return the original FQNs of parameters that require grad but have no gradient, sorted."""
    return sorted(
        clean_fqn(name)
        for name, p in model.named_parameters()
        if p.requires_grad and p.grad is None
    )


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the full value of every parameter, by original FQN."""
    return {clean_fqn(name): full_tensor(p) for name, p in model.named_parameters()}


#: Per-module hook dicts a snapshot records (their handle ids, in order).
HOOK_DICTS: tuple[str, ...] = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _local_copy(t: torch.Tensor) -> torch.Tensor:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.detach().clone()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device):
        return False
    return a.is_meta or torch.equal(a.nan_to_num(), b.nan_to_num())


def _state(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {
        "parameter": {
            n: (id(p), type(p), p.requires_grad, _local_copy(p))
            for n, p in model.named_parameters(remove_duplicate=False)
        },
        "buffer": {
            n: (id(b), type(b), _local_copy(b))
            for n, b in model.named_buffers(remove_duplicate=False)
        },
        "module": {
            n: (type(m), tuple(sorted(m.__dict__)), *(tuple(getattr(m, h, {})) for h in HOOK_DICTS))
            for n, m in model.named_modules(remove_duplicate=False)
        },
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _same_tensor(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class ModelSnapshot:
    """What `snapshot` saw of a model; `changes(model)` lists what differs now (see there)."""

    def __init__(self, model: nn.Module) -> None:
        self._state = _state(model)

    def changes(self, model: nn.Module) -> list[str]:
        """One line per difference between the snapshot and `model` now; empty: untouched."""
        now = _state(model)
        out: list[str] = []
        for kind, before in self._state.items():
            after = now[kind]
            out += [f"{kind} `{n}` removed" for n in before.keys() - after.keys()]
            out += [f"{kind} `{n}` added" for n in after.keys() - before.keys()]
            out += [
                f"{kind} `{n}` changed"
                for n in before.keys() & after.keys()
                if not _same(before[n], after[n])
            ]
        return sorted(out)


def snapshot(model: nn.Module) -> ModelSnapshot:
    """Record everything a refused `apply` must leave as it was, to check it afterwards.

    Covers each parameter and buffer (object identity, type, `requires_grad`, local values),
    each module (class, `__dict__` keys, so moetx's record and failure mark, and the ids of its
    forward, backward and state-dict hooks). Local values only: no collective.

    Example:
        >>> from torch import nn
        >>> model = nn.Linear(2, 2)
        >>> before = snapshot(model)
        >>> _ = model.register_forward_hook(lambda *args: None)
        >>> before.changes(model)
        ['module `` changed']
    """
    return ModelSnapshot(model)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings and lists/tuples into dotted keys; numbers become tensors."""
    if isinstance(tree, Mapping):
        items = [(str(k), v) for k, v in tree.items()]
    elif isinstance(tree, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(tree)]
    else:
        if isinstance(tree, numbers.Number) and not isinstance(tree, torch.Tensor):
            tree = torch.as_tensor(tree)
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def _fmt(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else str(x)


def _value_row(
    key: str, e: torch.Tensor, a: torch.Tensor, atol: float, rtol: float
) -> tuple[float, list[str]] | None:
    """Return (badness, table cells) if `a` is not close to `e`, else None."""
    if not (e.is_floating_point() or e.is_complex()):
        atol = rtol = 0.0
    wide = torch.complex128 if e.is_complex() or a.is_complex() else torch.float64
    e64, a64 = e.detach().cpu().to(wide), a.detach().cpu().to(wide)
    bad = ~torch.isclose(a64, e64, rtol=rtol, atol=atol)
    if e64.numel() == 0 or not bool(bad.any()):
        return None
    inf = math.inf
    diff = (a64 - e64).abs().nan_to_num(nan=inf, posinf=inf)
    scale = e64.abs()
    rel = torch.where(diff == 0, torch.zeros_like(diff), diff / scale).nan_to_num(
        nan=inf, posinf=inf
    )
    excess = (diff / (atol + rtol * scale)).nan_to_num(nan=inf, posinf=inf)
    worst = int(excess.flatten().argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e64.shape))
    e_norm, a_norm = float(e64.norm()), float(a64.norm())
    ratio = a_norm / e_norm if e_norm else (math.nan if a_norm == 0 else math.inf)
    cells = [
        key,
        f"{int(bad.sum())}/{e64.numel()}",
        _fmt(float(diff.max())),
        _fmt(float(rel.max())),
        f"{ratio:.2f}",
        str(where),
        _fmt(float(e64.flatten()[worst].abs()))
        if e.is_complex()
        else f"{float(e64.flatten()[worst]):.4g}",
        _fmt(float(a64.flatten()[worst].abs()))
        if a.is_complex()
        else f"{float(a64.flatten()[worst]):.4g}",
    ]
    return float(excess.max()), cells


def _table(rows: list[list[str]]) -> list[str]:
    header = [
        "key",
        "mismatched",
        "max_abs",
        "max_rel",
        "norm a/e",
        "worst at",
        "expected",
        "actual",
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]


def compare(
    expected: Mapping[str, Any],
    actual: Mapping[str, Any],
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    what: str = "gradients",
) -> None:
    """Assert that two (nested) mappings of tensors match, with a table of every difference.

    Elements match when `|actual - expected| <= atol + rtol * |expected|` (as in
    `torch.testing.assert_close`; NaN never matches); integer and bool tensors must be equal.
    Nested mappings and lists are compared leaf by leaf under dotted keys (`grads.layers.0.w`), and
    Python numbers are compared as tensors. Dtypes must agree too.

    The report lists missing and extra keys, shape and dtype mismatches, then one row per
    mismatching tensor, worst first: mismatching elements, max abs and rel diff, `norm a/e` (the
    ratio `actual.norm() / expected.norm()`: a 2x gradient-scale bug reads `2.00`), and the worst
    element with its expected and actual values.

    Args:
        expected: Reference results (from the single-process model).
        actual: Results to check (from one rank).
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        what: What is compared, for the first line of the message.

    Raises:
        AssertionError: Anything differs.
    """
    exp, act = _flatten(expected), _flatten(actual)
    missing = [k for k in exp if k not in act]
    extra = [k for k in act if k not in exp]
    problems: dict[str, list[str]] = {"shape": [], "dtype": [], "value": []}
    scored: list[tuple[float, list[str]]] = []
    for key in (k for k in exp if k in act):
        e, a = exp[key], act[key]
        if not (isinstance(e, torch.Tensor) and isinstance(a, torch.Tensor)):
            if type(e) is not type(a) or e != a:
                problems["value"].append(f"{key}: expected {e!r}, got {a!r}")
            continue
        if e.shape != a.shape:
            problems["shape"].append(f"{key}: expected {tuple(e.shape)}, got {tuple(a.shape)}")
            continue
        if e.dtype != a.dtype:
            problems["dtype"].append(f"{key}: expected {e.dtype}, got {a.dtype}")
        row = _value_row(key, e, a, atol, rtol)
        if row is not None:
            scored.append(row)
    n_values = len(scored) + len(problems["value"])
    if not (missing or extra or n_values or problems["shape"] or problems["dtype"]):
        return
    counts = [
        f"{n} {label}{'es' if n > 1 and label.endswith('mismatch') else ''}"
        for n, label in [
            (n_values, "value mismatch"),
            (len(problems["shape"]), "shape mismatch"),
            (len(problems["dtype"]), "dtype mismatch"),
            (len(missing), "missing"),
            (len(extra), "extra"),
        ]
        if n
    ]
    lines = [
        f"{what} do not match: {', '.join(counts)}, out of {len(exp)} expected "
        f"(atol={atol:g}, rtol={rtol:g})."
    ]
    if missing:
        lines.append(f"  missing from actual: {', '.join(missing)}")
    if extra:
        lines.append(f"  extra in actual: {', '.join(extra)}")
    lines += [f"  {kind}: {p}" for kind, ps in problems.items() for p in ps]
    scored.sort(key=lambda s: -s[0])
    if scored:
        lines += _table([cells for _, cells in scored[:_MAX_ROWS]])
    if len(scored) > _MAX_ROWS:
        lines.append(f"  ... and {len(scored) - _MAX_ROWS} more mismatching entries")
    raise AssertionError("\n".join(lines))
