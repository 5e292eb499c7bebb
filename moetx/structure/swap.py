"""Give one module instance new behaviour by swapping its class, keeping every name unchanged.

The trick FSDP2's `fully_shard` uses: the instance's class becomes a generated subclass of
`(Mixin, OriginalClass)`, so the mixin's `forward` can wrap the original one (`super().forward`)
while parameter FQNs and state-dict keys stay exactly as they were (a wrapper module would add a
prefix to every name). Generated classes are cached per (mixin, original class) pair, so two
instances of one class share one generated class.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_GENERATED: dict[tuple[type, type], type] = {}


def swap_class(module: nn.Module, mixin: type, prefix: str, state_attr: str, state: Any) -> None:
    """Make `module` an instance of `prefix + ClassName(mixin, ClassName)` and attach `state`.

    Idempotent on the class: a module that already has the mixin only gets its `state` replaced.
    `state` is stored in the instance `__dict__` under `state_attr` (not as a submodule/buffer).
    """
    cls = type(module)
    if not issubclass(cls, mixin):
        new_cls = _GENERATED.get((mixin, cls))
        if new_cls is None:
            new_cls = type(f"{prefix}{cls.__name__}", (mixin, cls), {})
            _GENERATED[(mixin, cls)] = new_cls
        module.__class__ = new_cls
    module.__dict__[state_attr] = state
