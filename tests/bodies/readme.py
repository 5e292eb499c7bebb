"""Rank body: run the README's training-loop example as written."""

from __future__ import annotations

from typing import Any

from moetx.testing import parameters


def run_example(source: str, checkpoint_dir: str) -> dict[str, Any]:
    """Execute the README block, call its `main(checkpoint_dir)`; losses and full parameters."""
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(source, "README.md", "exec"), namespace)
    model, losses = namespace["main"](checkpoint_dir)
    return {"losses": losses, "params": parameters(model)}
