"""A checkpointed block's KV cache: recomputation replays the forward's cache updates, never appends.

Hugging Face attention layers append their keys and values to the cache they are given
(`cache.update(k, v, layer_idx)` returns the cache's keys and values so far). Backward re-runs a
checkpointed block with the same arguments, so with `use_cache=True` the recomputation appended
the block's K/V a second time (the cache then held each checkpointed layer's tokens twice) and
attended over the doubled keys. While a checkpointed call runs, the cache's `update` is
replaced: forward records what each call returned, recomputation returns the same tensors in the
same order and leaves the cache alone. The recorded tensors are the ones the cache itself holds.
"""

from __future__ import annotations

from typing import Any

from moetx.core.errors import ActivationCheckpointError

__all__ = ["CACHE_KWARGS", "UpdateReplay", "kv_cache"]

#: Keyword arguments Hugging Face decoder layers take their KV cache by (v5, and v4's names).
CACHE_KWARGS: tuple[str, ...] = ("cache", "past_key_values", "past_key_value")


def kv_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a block call was given (an object with an `update` method), else None."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None and callable(getattr(cache, "update", None)):
            return cache
    return None


class UpdateReplay:
    """The cache updates of one checkpointed call: recorded in forward, replayed in recompute."""

    def __init__(self, cache: Any, fqn: str) -> None:
        self.cache, self.fqn = cache, fqn
        self.returned: list[Any] = []
        self._shadowed: tuple[bool, Any] = (False, None)

    def patch(self, phase: int) -> None:
        """Replace the cache's `update` for the call: record (phase 0) or replay (phase 1)."""
        real = self.cache.update
        calls = iter(range(len(self.returned)))

        def record(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            self.returned.append(out)
            return out

        def replay(*args: Any, **kwargs: Any) -> Any:
            i = next(calls, None)
            if i is None:
                raise ActivationCheckpointError(
                    f"`{self.fqn}`: a recomputation updated the KV cache more often than the "
                    f"forward did ({len(self.returned)}); the block's control flow changed in "
                    "backward."
                )
            return self.returned[i]

        own = vars(self.cache)
        self._shadowed = ("update" in own, own.get("update"))
        own["update"] = record if phase == 0 else replay

    def unpatch(self) -> None:
        """Give the cache its own `update` back."""
        had, previous = self._shadowed
        own = vars(self.cache)
        if had:
            own["update"] = previous
        else:
            own.pop("update", None)
