"""The notebooks in `notebooks/` run top to bottom on CPU, and are committed without outputs."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbclient  # the `dev` extra installs nbclient, nbformat, ipykernel and matplotlib
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
#: Per-notebook budget (STYLE §8.7 asks for about two minutes; a loaded 2-core CI box gets slack).
TIMEOUT_S = 300


def test_there_are_numbered_notebooks() -> None:
    """The notebooks exist and are named `NN-topic.ipynb`."""
    assert [p.name for p in NOTEBOOKS][:3] == [
        "00-quickstart.ipynb",
        "10-parity.ipynb",
        "20-memory.ipynb",
    ]
    assert all(re.fullmatch(r"\d\d-[a-z0-9-]+\.ipynb", p.name) for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path) -> None:
    """No outputs, execution counts or absolute paths; the first code cell prints the version and seeds."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs; strip them before committing"
    text = path.read_text()
    assert not re.search(r"(/work/|/home/|/root/|/Users/|[A-Z]:\\\\)", text), (
        f"{path.name}: absolute path"
    )
    first = code[0].source
    assert "import moetx" in first and "moetx.__version__" in first and "manual_seed" in first


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernelspec that runs *this* interpreter, visible to jupyter_client for this module only.

    ipykernel's own `python3` spec would do after `pip install -e .[dev]`, but a user-level
    `python3` spec (which jupyter_client prefers) may point at another interpreter.
    """
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "moetx-test"
    spec.mkdir(parents=True)
    repo = str(Path(__file__).parent.parent)
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {
        "argv": argv,
        "display_name": "moetx tests",
        "language": "python",
        "env": {"PYTHONPATH": path},
    }
    (spec / "kernel.json").write_text(json.dumps(kernel))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        yield "moetx-test"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path: Path, kernel_name: str) -> None:
    """Every cell runs without error on CPU, within the time budget, from the notebooks' folder."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=TIMEOUT_S,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell on any error
    elapsed = time.perf_counter() - start
    print(
        f"{path.name}: {elapsed:.1f} s (python {sys.version_info.major}.{sys.version_info.minor})"
    )
    assert elapsed < TIMEOUT_S
