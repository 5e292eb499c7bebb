"""The two slots through which layers above the core serve it: mesh coercion and planning.

The core is moetx's bottom layer and imports nothing above it, yet `Pass.apply` accepts a
torch `DeviceMesh` (turned into a `ParallelMesh` by the mesh layer) and `Pipeline.plan` runs the
planner (which applies passes on `meta` under a fake world, three layers up). Those layers
install their function here when they are imported, and importing any part of moetx imports
them all (`moetx/__init__.py`), so the slots are always filled. The dependency is an interface
the core declares, not an import that points up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["coerce_mesh", "install_mesh_coercion", "install_planner", "run_planner"]

_mesh_coercion: Callable[[Any], Any] | None = None
_planner: Callable[..., Any] | None = None


def install_mesh_coercion(fn: Callable[[Any], Any]) -> None:
    """Install the function that turns whatever `apply` receives into a `ParallelMesh`."""
    global _mesh_coercion
    _mesh_coercion = fn


def install_planner(fn: Callable[..., Any]) -> None:
    """Install the function behind `Pipeline.plan`."""
    global _planner
    _planner = fn


def coerce_mesh(mesh: Any) -> Any:
    """The `ParallelMesh` for `mesh` (a `ParallelMesh` or a named `DeviceMesh`)."""
    if _mesh_coercion is None:  # pragma: no cover - moetx/__init__ imports the mesh layer
        raise RuntimeError("moetx.mesh is not imported; `import moetx` first.")
    return _mesh_coercion(mesh)


def run_planner(*args: Any, **kwargs: Any) -> Any:
    """Call the installed planner (`moetx.planning.plan`)."""
    if _planner is None:  # pragma: no cover - moetx/__init__ imports the planning layer
        raise RuntimeError("moetx.planning is not imported; `import moetx` first.")
    return _planner(*args, **kwargs)
