"""The package stays layered: imports point down, never up, and nothing hides a cycle in a function.

Read from the source (an AST walk, nothing imported), so the next feature cannot quietly bend
the house: a module may import moetx modules of its own layer or of layers below it, only at
module level (or under `if TYPE_CHECKING:`, which never runs), and no module grows past
`MAX_LINES`. Test bodies live in `tests/bodies/`, never in the installed package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moetx"

# Lowest first. A module belongs to the first entry whose prefix matches its dotted name.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("moetx.core",),
    ("moetx.mesh",),
    ("moetx.structure", "moetx.models"),
    ("moetx.passes",),
    ("moetx.training",),
    ("moetx.planning",),
    ("moetx", "moetx.testing"),  # the public face: re-exports, and helpers built on it
    ("moetx.cli", "moetx.__main__"),
)
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    best, depth = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = i, len(prefix)
    assert best >= 0, f"{module} is in no layer: add it to LAYERS"
    return best


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported moetx module, line, inside a function) for every import outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def enclosing(node: ast.AST, kinds: tuple[type, ...]) -> ast.AST | None:
        while node in parents:
            node = parents[node]
            if isinstance(node, kinds):
                return node
        return None

    def type_checking_only(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                return True
        return False

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if (name == "moetx" or name.startswith("moetx.")) and not type_checking_only(node):
                in_function = enclosing(node, (ast.FunctionDef, ast.AsyncFunctionDef)) is not None
                found.append((name, node.lineno, in_function))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer() -> None:
    """Each module of the package sits in exactly one named layer."""
    for path in MODULES:
        _layer(_module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_point_down_and_sit_at_module_level(path: Path) -> None:
    """A module imports moetx modules of its own layer or below, never inside a function."""
    module = _module_name(path)
    mine = _layer(module)
    for name, line, in_function in _imports(path):
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        assert not in_function, f"{where} inside a function: import it at module level"
        assert _layer(name) <= mine, (
            f"{where}, a higher layer ({LAYERS[_layer(name)]} above {LAYERS[mine]}); "
            "move the shared piece down, or plug in through `moetx.core.seams`"
        )


def test_no_module_is_too_long() -> None:
    """Modules stay small enough to read in one sitting; split by responsibility past that."""
    sizes = {_module_name(p): len(p.read_text().splitlines()) for p in MODULES}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


def test_no_test_bodies_ship_in_the_package() -> None:
    """Rank bodies used only by the test suite live in `tests/bodies/`."""
    shipped = [p for p in MODULES if "bodies" in p.parts or "selftest" in p.name]
    assert shipped == []


def test_the_layer_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself fails on an upward and on a function-level import (it can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("from moetx.planning import plan\n\ndef f():\n    from moetx.core import Pass\n")
    found = _imports(bad)
    assert ("moetx.planning", 1, False) in found
    assert ("moetx.core", 4, True) in found
    assert _layer("moetx.planning") > _layer("moetx.core.algebra")
