"""`ExpertParallel`: shard every MoE layer's routed experts over the `ep` mesh axis."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from moetx.core.algebra import Pass, register_pass
from moetx.core.errors import (
    ExpertDivisibilityError,
    MeshAxisError,
    NoMoELayersError,
    PassPreconditionError,
)
from moetx.core.options import axis_name, flag, one_of, option
from moetx.core.order import Placement
from moetx.core.record import Applied
from moetx.passes.expert_parallel.dedup import DedupAllToAllDispatcher
from moetx.passes.expert_parallel.dispatch import DISPATCHERS, TokenDispatcher, make_dispatcher
from moetx.passes.foreign import refuse_foreign_parallelism
from moetx.passes.load_sync import sync_routing_load
from moetx.structure.discovery import MOE_NAMES, ROUTER_NAMES, MoELayer, discover
from moetx.structure.shards import LocalShards, attach_local_shards
from moetx.structure.swap import swap_class

if typing.TYPE_CHECKING:
    from moetx.mesh.parallel_mesh import ParallelMesh

__all__ = ["ExpertParallel", "is_expert_parallel"]

_STATE_ATTR = "_moetx_expert_parallel"


@register_pass("ep")
@typing.final
@attrs.frozen(kw_only=True, repr=False)
class ExpertParallel(Pass):
    """Shard every MoE layer's routed experts over a mesh axis and route tokens to them.

    **What it shards.** Every stacked routed-expert parameter (`gate_up_proj [E, 2I, H]`,
    `down_proj [E, H, I]`, as `moetx.structure.discovery.discover` reports them) of every MoE layer, in
    the backbone and the MTP head, becomes an `nn.Parameter` holding a DTensor `Shard(0)` on
    `mesh[axis]`: ep rank r holds global experts `[r * E/D, (r + 1) * E/D)`. Names, global
    shapes and `requires_grad` are kept, so state-dict keys and checkpoints hold the global
    expert tensors. Routers, shared experts and dense parameters are untouched. Works on a
    `meta`-built model (no communication at apply time: each rank keeps its chunk of its own
    values, as FSDP2 does, so ranks must build identical values, e.g. with `init_weights_`).

    **Forward.** Each experts module's class is swapped for a generated subclass (as FSDP2's
    `fully_shard` does; the module keeps its name and place), whose `forward(hidden,
    top_k_index, top_k_weights)` dispatches the token copies to their experts' ranks, calls
    the *original* forward on the local shard with local expert ids and unit weights (on a
    view of the module built at apply time whose weights are their `to_local()` shards and
    whose expert count is the local one; the module itself is never changed in forward, so
    the call traces inside a compiled checkpoint), and combines: the routing
    weights are applied on the sending rank after the outputs return. Any experts module that
    obeys the experts contract works. Dispatchers (`moetx.passes.expert_parallel.dispatch`):
    `"all_to_all"` (default; per MoE layer, forward: one int64 count exchange and two uneven
    autograd all-to-alls, backward: two) and `"all_gather"` (a simple cross-check that moves
    D times more data). Both are built here, at apply time, and both trace under
    `torch.compile`: the data-dependent steps become opaque custom ops while compiling
    (`moetx.passes.expert_parallel.ops`), so a block compiles into one graph with the same
    collectives.

    **Dedup.** `dedup=True` (all-to-all only) sends a token once to each rank holding any of
    its k experts, with its routing weights for them, expands it there, and sends back one
    weighted partial sum per (token, rank) (`moetx.passes.expert_parallel.dedup`; the weights'
    gradients travel back with the hidden states'): the same collectives, fewer bytes when a
    token's experts share a rank, a few more (weight and mask columns) when they never do
    (top-1, or one expert per rank, where it dispatches per copy instead).

    **Degree 1.** With `mesh.degree(axis) == 1` nothing is installed: experts stay plain local
    tensors and `facts()["expert_params"]` is empty (FSDP then treats them as dense).

    **Gradient scale.** After backward, an expert-shard gradient is the *sum* over every
    token of the ep group routed to it (the all-to-all backward returns each copy's gradient
    to the owning rank); every other gradient covers only this rank's tokens. So a
    data-parallel step with per-rank mean losses averages non-expert gradients over all W
    ranks, and sums each expert-shard gradient over the ranks holding the same shard, then
    divides by W: never by, or times, the ep degree (pytorch#160285). The `FSDP` pass does this
    with `set_gradient_divide_factor(W)` on the expert units.

    Stage `ep`: after `cp`, before `ac` and `fsdp` (it replaces parameters, which FSDP must
    then wrap). `apply` consumes its input: it mutates the model in place and returns it.

    Preconditions (checked before anything changes, each a typed `MoetxError`):
        - `axis` is `"ep"`, and the mesh has it (`MeshAxisError`);
        - the model holds no parallelism from outside moetx: no torch `fully_shard` unit, no
          DTensor parameter moetx did not place (`PassPreconditionError`);
        - the model has at least one MoE layer (`NoMoELayersError`);
        - every MoE layer's expert count is divisible by the degree (`ExpertDivisibilityError`);
        - `dedup` only with the all-to-all dispatcher (`PassPreconditionError`).

    Upstream APIs: `torch.distributed.tensor.distribute_tensor` (`src_data_rank=None`),
    `torch.distributed._functional_collectives.all_to_all_single` /
    `all_to_all_single_autograd` / `all_gather_single(_autograd)` /
    `reduce_scatter_single_autograd`, `DTensor.to_local`.

    Args:
        axis: Mesh axis the experts are sharded over; its degree is read from the mesh.
        dispatcher: `"all_to_all"` or `"all_gather"`.
        dedup: Send each token once per destination rank (all-to-all dispatcher only).

    Example:
        >>> ExpertParallel(dispatcher="all_gather")
        ExpertParallel(dispatcher='all_gather')
    """

    placement: ClassVar[Placement] = Placement.builtin("ep")

    axis: str = option("ep", axis_name())
    dispatcher: str = option("all_to_all", one_of(*DISPATCHERS))
    dedup: bool = option(False, flag())

    def check(self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]) -> None:
        """Raise if the mesh lacks the axis, the model has no MoE layer, E % degree != 0, or
        `dedup` is asked of the all-gather dispatcher."""
        refuse_foreign_parallelism(model, record, by="ExpertParallel")
        if self.dedup and self.dispatcher != "all_to_all":
            raise PassPreconditionError(
                f"`{self!r}`: `dedup` sends each token once per rank with the all-to-all "
                f"dispatcher; the {self.dispatcher!r} dispatcher already sends each token once "
                "to every rank.\n  fix: drop `dedup`, or use dispatcher='all_to_all'."
            )
        mesh.require(self.axis, by="ExpertParallel")
        if self.axis != "ep":
            raise MeshAxisError(
                f"`{self!r}` names the mesh axis `{self.axis}`, but moetx lays experts out on "
                "the `ep` axis only (FSDP shards them over `ep_shard`, the ranks left in each "
                "expert group, which is carved from it).\n"
                "  fix: use `ExpertParallel()` and set the degree with "
                "`ParallelMesh.build(ep=...)`."
            )
        layers = self._moe_layers(model)
        degree = mesh.degree(self.axis)
        bad = [layer for layer in layers if layer.num_experts % degree]
        if bad:
            lines = [
                f"`{layer.experts_fqn}` has {layer.num_experts} experts, not divisible by ep "
                f"degree {degree}."
                for layer in bad
            ]
            counts = {layer.num_experts for layer in layers}
            divisors = [d for d in range(1, min(counts) + 1) if all(n % d == 0 for n in counts)]
            raise ExpertDivisibilityError(
                "\n".join(lines) + "\n"
                f"  fix: build the mesh with an ep degree that divides every expert count "
                f"(one of {divisors}), or use a multiple of {degree} experts."
            )

    def _apply(
        self, model: nn.Module, mesh: ParallelMesh, record: tuple[Applied, ...]
    ) -> nn.Module:
        # Routing-load counters count every token rank's tokens, not this rank's (load_sync).
        sync_routing_load(model, mesh)
        degree = mesh.degree(self.axis)
        if degree == 1:
            return model
        ep_mesh = mesh[self.axis]
        replaced: dict[int, nn.Parameter] = {}
        for layer in self._moe_layers(model):
            experts = layer.experts
            for name in layer.expert_param_names:
                param = getattr(experts, name)
                if id(param) not in replaced:
                    replaced[id(param)] = _shard(param, ep_mesh)
                setattr(experts, name, replaced[id(param)])
            shards = attach_local_shards(experts, layer.expert_param_names)
            local = _local_view(experts, layer, shards, layer.num_experts // degree)
            _install(
                experts,
                _EPState(
                    ep_mesh,
                    self.dispatcher,
                    layer.num_experts,
                    layer.expert_param_names,
                    layer.num_experts_attr,
                    self._dispatcher(ep_mesh, layer.num_experts),
                    local,
                ),
            )
        return model

    def facts(self, model: nn.Module, mesh: ParallelMesh) -> Mapping[str, Any]:
        """`axis`, `degree`, and `expert_params`: FQNs of the parameters this pass sharded."""
        degree = mesh.degree(self.axis)
        names = tuple(discover(model).expert_parameters()) if degree > 1 else ()
        return {"axis": self.axis, "degree": degree, "expert_params": names}

    def _dispatcher(self, ep_mesh: DeviceMesh, num_experts: int) -> TokenDispatcher:
        if not self.dedup:
            return make_dispatcher(self.dispatcher, ep_mesh, num_experts)
        return DedupAllToAllDispatcher(
            group=ep_mesh.get_group(),
            rank=ep_mesh.get_local_rank(),
            degree=ep_mesh.size(),
            num_experts=num_experts,
        )

    @staticmethod
    def _moe_layers(model: nn.Module) -> tuple[MoELayer, ...]:
        layers = discover(model).moe_layers()
        if not layers:
            moe = " or ".join(f"`{n}`" for n in MOE_NAMES)
            router = " or ".join(f"`{n}`" for n in ROUTER_NAMES)
            raise NoMoELayersError(
                f"`{type(model).__name__}` has no MoE layers for `ExpertParallel` to shard: looked "
                f"in every decoder block (and MTP block) for an {moe} child that has both an "
                f"`experts` and a {router} child.\n"
                "  fix: leave `ExpertParallel` out of the pipeline for dense models, or register "
                "a structure adapter (`moetx.structure.register_structure_adapter`)."
            )
        return layers


# ------------------------------------------------------------------------ sharding the experts


def _shard(param: nn.Parameter, ep_mesh: DeviceMesh) -> nn.Parameter:
    # src_data_rank=None: every rank keeps its own chunk (a compact copy), no scatter; this
    # works on meta, like FSDP2's sharding.
    dt = distribute_tensor(param.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
    return nn.Parameter(dt, requires_grad=param.requires_grad)


@attrs.frozen(eq=False)
class _EPState:
    """Configuration stored on a sharded experts module (never changed after `apply`)."""

    mesh: DeviceMesh
    dispatcher: str
    num_experts: int
    param_names: tuple[str, ...]
    count_attr: str | None = None  # the experts' own expert-count attribute (`num_experts`)
    #: Built at apply time: the forward constructs no attrs object (`torch.compile` cannot).
    token_dispatcher: TokenDispatcher | None = None
    #: The same experts seen through their local shards (`_local_view`), built at apply time.
    local_view: nn.Module | None = None


class _ExpertParallelExperts(nn.Module):
    """Mixin placed in front of the experts class: dispatch -> original forward -> combine."""

    def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        state: _EPState = self.__dict__[_STATE_ATTR]
        dispatcher, view = state.token_dispatcher, state.local_view
        assert dispatcher is not None and view is not None
        tokens, expert_ids, plan = dispatcher.dispatch(hidden, top_k_index, top_k_weights)
        local = view.__dict__[_SHARDS].tensors()
        ones = torch.ones(tokens.shape[0], 1, dtype=top_k_weights.dtype, device=tokens.device)
        # The original class's forward on the local view: no hooks, no module state changed.
        out = type(view).forward(view, tokens, expert_ids.unsqueeze(1), ones)
        if torch.compiler.is_compiling() or tokens.shape[0] == 0:
            # No token reached this rank: tie the (empty) output to the local parameters so
            # they get zero gradients, never None, even if the experts skip unused weights.
            # Compiled, the row count is unknown at trace time, so the tie is always there
            # (adding an exact zero).
            out = out + sum(p.sum() for p in local.values()) * 0
        combined = dispatcher.combine(out, plan)
        # Never hand back a view: when FSDP wraps these experts, an in-place op by the caller
        # on a view output (`out += shared`) would silently drop FSDP's pre-backward hook.
        return combined.clone() if combined._base is not None else combined


def _local_view(
    experts: nn.Module, layer: MoELayer, shards: LocalShards, local_count: int
) -> nn.Module:
    """A second instance of the experts' class that sees `experts` through its local shards.

    The original forward must run on this rank's shard: the local tensors as its weights, and the
    local expert count (HF transformers' experts size their grouped_mm offsets, `histc(bins=
    self.num_experts)`, and `one_hot` masks from `self.num_experts`; with the global count
    grouped_mm fails, "matrix batch sizes have to match"; HF's own EP sets it the same way).
    Swapping them into the module around the call is a side effect that dynamo refuses inside a
    checkpoint ("HOP: Unsafe side effect"), and `torch.func.functional_call` would also run our
    own forward and every module hook (FSDP2's). So the view is built once, here: an instance of
    a generated subclass of the experts' class whose expert weights are properties reading the
    live parameters of `experts` (whatever FSDP has put there) through `shards`
    (`moetx.structure.shards`: `to_local`, differentiable, so the DTensor parameters get the
    gradients, run outside a compiled checkpoint), and whose `training` follows `experts`. It
    shares the experts' `_parameters`, `_buffers` and `_modules` dicts, holds the local count,
    and is no child of anything (never in `named_parameters`, `state_dict` or hooks).
    """
    cls = type(experts)
    key = (cls, layer.expert_param_names)
    view_cls = _VIEW_CLASSES.get(key)
    if view_cls is None:
        props: dict[str, Any] = {n: property(_local_getter(n)) for n in layer.expert_param_names}
        props["training"] = property(lambda self: self.__dict__[_SHARDS].module.training)
        view_cls = type(f"Local{cls.__name__}", (cls,), props)
        _VIEW_CLASSES[key] = view_cls
    view: nn.Module = object.__new__(view_cls)  # no __init__: the state is the experts'
    view.__dict__.update({k: v for k, v in experts.__dict__.items() if k != "training"})
    view.__dict__[_SHARDS] = shards
    if layer.num_experts_attr is not None:
        view.__dict__[layer.num_experts_attr] = local_count
    return view


def _local_getter(name: str) -> Any:
    def local(self: nn.Module) -> Tensor:
        return self.__dict__[_SHARDS].tensors()[name]  # type: ignore[no-any-return]

    return local


_SHARDS = "_moetx_local_view_shards"
_VIEW_CLASSES: dict[tuple[type, tuple[str, ...]], type[nn.Module]] = {}


def _install(experts: nn.Module, state: _EPState) -> None:
    swap_class(experts, _ExpertParallelExperts, "ExpertParallel", _STATE_ATTR, state)


def is_expert_parallel(module: nn.Module) -> bool:
    """Whether `module` is an experts module that `ExpertParallel` sharded (degree > 1)."""
    return _STATE_ATTR in module.__dict__
