"""The notebooks in `notebooks/` run top to bottom on CPU, and are committed without outputs."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
#: Per-notebook budget (STYLE §8.7 asks for about two minutes; a loaded 2-core CI box gets slack).
TIMEOUT_S = 300


def test_there_are_numbered_notebooks() -> None:
    """The notebooks exist and are named `NN-topic.ipynb`."""
    assert [p.name for p in NOTEBOOKS][:3] == ["00-quickstart.ipynb", "10-parity.ipynb", "20-memory.ipynb"]
    assert all(re.fullmatch(r"\d\d-[a-z0-9-]+\.ipynb", p.name) for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path) -> None:
    """No outputs, execution counts or absolute paths; the first code cell prints the version and seeds."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs; strip them before committing"
    text = path.read_text()
    assert not re.search(r"(/work/|/home/|/root/|/Users/|[A-Z]:\\\\)", text), f"{path.name}: absolute path"
    first = code[0].source
    assert "import moetx" in first and "moetx.__version__" in first and "manual_seed" in first


def _kernel_name() -> str:
    """`python3`, made available from this interpreter if no kernelspec is installed."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:  # e.g. a venv whose ipykernel data files were not installed
        from ipykernel.kernelspec import install

        install(user=True)
    return "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path: Path) -> None:
    """Every cell runs without error on CPU, within the time budget, from the notebooks' folder."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=_kernel_name(),
        timeout=TIMEOUT_S,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell on any error
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f} s (python {sys.version_info.major}.{sys.version_info.minor})")
    assert elapsed < TIMEOUT_S
