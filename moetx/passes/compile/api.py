"""`Compile`: `torch.compile` each transformer block, as torchtitan does, keeping every name."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from moetx.core.algebra import Pass, register_pass
from moetx.core.errors import PassPreconditionError
from moetx.core.options import Rule, flag, one_of, option
from moetx.core.order import Placement
from moetx.core.record import Applied
from moetx.passes.compile.report import CompileReport, CountingBackend
from moetx.passes.foreign import refuse_foreign_parallelism
from moetx.passes.load_sync import sync_routing_load
from moetx.structure.discovery import Block, discover
from moetx.structure.shards import LocalShards, local_shards
from moetx.structure.swap import swap_class

if typing.TYPE_CHECKING:
    from moetx.mesh.parallel_mesh import ParallelMesh

__all__ = ["BACKENDS", "Compile", "compile_report", "is_compiled"]

BACKENDS: tuple[str, ...] = ("inductor", "aot_eager", "eager")
"""Values `Compile.backend` accepts."""

MODES: tuple[str | None, ...] = (
    None,
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)

_STATE_ATTR = "_moetx_compile"

_DYNAMIC = Rule("True, False or None", lambda v: v is None or isinstance(v, bool))


@register_pass("compile")
@typing.final
@attrs.frozen(kw_only=True, repr=False)
class Compile(Pass):
    """Compile each transformer block's forward with `torch.compile` (per block, as torchtitan).

    **What it compiles.** Every block `discover` reports (backbone, then MTP) gets its
    `forward` compiled: the class is swapped for a generated subclass (as FSDP2 and
    `ActivationCheckpoint` do) whose `forward` calls `torch.compile` of the previous `forward`.
    So parameter FQNs and state-dict keys are unchanged (`torch.compile(module)` would add
    `_orig_mod.` to every key), and the block's *module* hooks stay outside the compiled region:
    `FSDP`, applied later, puts the block's all-gather / reshard hooks on `__call__`, around the
    compiled forward, never inside it (`nn.Module.compile()` would compile `_call_impl`, hooks
    included). Under `ActivationCheckpoint` the compiled forward is the checkpointed one, so
    dynamo traces `checkpoint` itself and each AC mode becomes a save/recompute policy
    (`moetx.passes.activation_checkpoint.compiled`).

    **Nested FSDP units.** `FSDP` makes the routed experts of an MoE block their own unit (on
    the expert mesh under `ExpertParallel`). Their hooks would sit inside the compiled block, so
    with `Compile` in the record `FSDP` drives that unit from the block's own hooks instead
    (`moetx.passes.fsdp.compiled`): the experts' module hooks are removed and the block's
    pre-forward unshards them, so a block compiles with `fullgraph=True`.

    **What it reports.** Graphs are known only after a block ran once. The facts hold a live
    `CompileReport` (`compile_report(model)`), filled by each block's first call: compiled
    graphs that ran and dynamo's graph breaks. A block whose first call ran no compiled graph
    (all eager) warns with `EagerBlockWarning` and from then on calls its forward directly
    (without dynamo's per-call checks); `fullgraph=True` makes any break an error.
    All blocks share one backend, so identical blocks reuse one compiled graph.

    **Not yet whole** (they warn, and `fullgraph=True` raises): under `ExpertParallel`, blocks
    `ActivationCheckpoint` also wraps (expert parallelism swaps its local weights into the
    module inside the checkpointed region, a side effect dynamo refuses in the checkpoint
    region); the synthetic model's sequence-wise aux loss breaks each MoE block (`bincount`).

    Stage `compile`: after `ac`, before `fsdp`. Preconditions (typed errors before anything
    changes): blocks discoverable (`UnknownModelStructureError`), no parallelism from outside
    moetx, no block already compiled (`PassPreconditionError`).

    Args:
        backend: `"inductor"` (default), `"aot_eager"` or `"eager"` (dynamo only).
        mode: `torch.compile`'s mode (inductor only), or None.
        fullgraph: Raise at the first graph break instead of splitting the block.
        dynamic: `torch.compile`'s `dynamic` (None: dynamo decides).

    Example:
        >>> Compile(backend="aot_eager", fullgraph=True)
        Compile(backend='aot_eager', fullgraph=True)
    """

    placement: ClassVar[Placement] = Placement.builtin("compile")

    backend: str = option("inductor", one_of(*BACKENDS))
    mode: str | None = option(None, one_of(*MODES))
    fullgraph: bool = option(False, flag())
    dynamic: bool | None = option(None, _DYNAMIC)

    def check(self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]) -> None:
        """Raise if blocks are missing, the model is sharded elsewhere, or already compiled."""
        refuse_foreign_parallelism(model, record, by="Compile")
        structure = discover(model)
        name = type(model).__name__
        if not structure.blocks:
            raise PassPreconditionError(f"`{name}` has no transformer blocks for `Compile`.")
        if self.mode is not None and self.backend != "inductor":
            raise PassPreconditionError(
                f"`{self!r}`: `mode` selects an inductor configuration, and the backend is "
                f"{self.backend!r}.\n  fix: drop `mode`, or use backend='inductor'."
            )
        compiled = [
            fqn or "(the model)"
            for fqn, m in model.named_modules()
            if getattr(m, "_compiled_call_impl", None) is not None
            or isinstance(m, torch._dynamo.eval_frame.OptimizedModule)
        ]
        if compiled:
            raise PassPreconditionError(
                f"`{name}` is already compiled outside moetx (`{compiled[0]}`); `Compile` "
                "would compile it twice.\n  fix: build the model afresh and let `Compile` "
                "compile its blocks."
            )

    def _apply(
        self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]
    ) -> nn.Module:
        # Routing-load counters count every token rank's tokens, not this rank's (load_sync).
        sync_routing_load(model, mesh)
        blocks = discover(model).blocks
        report = CompileReport(self.backend, tuple(b.fqn for b in blocks))
        options = {"mode": self.mode} if self.mode is not None else {}
        backend = CountingBackend(self.backend, options)
        for block in blocks:
            _install(block, report, backend, self.fullgraph, self.dynamic)
        model.__dict__[_STATE_ATTR] = report
        return model

    def facts(self, model: nn.Module, mesh: ParallelMesh) -> Mapping[str, Any]:
        """`backend`, `blocks` (compiled FQNs), `report`: the live `CompileReport`."""
        report: CompileReport = model.__dict__[_STATE_ATTR]
        return {"backend": self.backend, "blocks": report.block_fqns, "report": report}


@attrs.define(eq=False)
class _BlockCompile:
    fqn: str
    report: CompileReport
    backend: CountingBackend
    inner: Any = None  # the forward before this pass
    compiled: Any = None
    seen: bool = False
    #: The block's `LocalShards` (experts under `ExpertParallel`), hoisted around each compiled call.
    shards: tuple[LocalShards, ...] = ()


class _CompiledBlock(nn.Module):
    """Mixin placed in front of a block's class: its forward runs compiled."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state: _BlockCompile = self.__dict__[_STATE_ATTR]
        if state.compiled is state.inner:
            return state.inner(*args, **kwargs)
        # DTensor -> local shards here, eagerly, so the compiled graph holds no DTensor (its
        # `DeviceMesh` saved for backward breaks a checkpointed graph: `moetx.structure.shards`).
        for shards in state.shards:
            shards.hoist()
        try:
            if state.seen:
                return state.compiled(*args, **kwargs)
            state.seen = True
            out = state.backend.first_call(
                state.report, state.fqn, lambda: state.compiled(*args, **kwargs)
            )
        finally:
            for shards in state.shards:
                shards.drop()
        if state.report.blocks[state.fqn].graphs == 0:  # eager anyway: skip dynamo's frame checks
            state.compiled = state.inner
        return out


def _install(
    block: Block,
    report: CompileReport,
    backend: CountingBackend,
    fullgraph: bool,
    dynamic: bool | None,
) -> None:
    state = _BlockCompile(block.fqn, report, backend, shards=local_shards(block.module))
    swap_class(block.module, _CompiledBlock, "Compiled", _STATE_ATTR, state)
    inner = super(_CompiledBlock, block.module).forward  # type: ignore[misc]  # the one before
    state.inner = inner
    state.compiled = torch.compile(inner, backend=backend, fullgraph=fullgraph, dynamic=dynamic)


def is_compiled(module: nn.Module) -> bool:
    """Whether `Compile` compiled `module` (a block)."""
    return _STATE_ATTR in module.__dict__ and isinstance(
        module.__dict__[_STATE_ATTR], _BlockCompile
    )


def compile_report(model: nn.Module) -> CompileReport:
    """The live per-block compile report of a model `Compile` was applied to.

    Raises:
        PassPreconditionError: `model` was not compiled by `Compile`.
    """
    report = model.__dict__.get(_STATE_ATTR)
    if not isinstance(report, CompileReport):
        raise PassPreconditionError(
            f"`{type(model).__name__}` has no `Compile` in its pipeline, so no compile report.\n"
            "  fix: apply a pipeline with `Compile()` and run one forward first."
        )
    return report
