"""Execute every notebook in notebooks/ top to bottom and fail on any cell error.

Each notebook runs in a fresh kernel (the `python3` kernelspec; jupyter_client starts it with this test's own
interpreter, which the first injected cell checks) with a temporary working directory, so nothing is written
into the repository. Every notebook ends with a cell of assertions, so a silent failure shows as an error.
Select with `pytest -m notebooks`; the six notebooks take a few minutes on a CPU.

The kernels get OMP_NUM_THREADS=1 unless it is already set: on a small shared CPU machine, torch's default of
one thread per core oversubscribes the cores and ran the exact read-out 4-5 times slower than one thread.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
PREFIX_CHECK = "import sys\nprint(sys.prefix)"


def _errors(notebook) -> list[str]:
    """One message per cell that produced an error output."""
    messages = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                trace = "\n".join(output.get("traceback", []))
                messages.append(f"cell {index}: {output.get('ename')}: {output.get('evalue')}\n{trace[-3000:]}")
    return messages


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == [
        "01_audit.ipynb",
        "02_attribution.ipynb",
        "03_patching_and_heads.ipynb",
        "04_pruning_and_anomalies.ipynb",
        "05_generalization.ipynb",
        "06_bias_types.ipynb",
    ]


def test_notebooks_stored_without_outputs():
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has stored outputs"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(PREFIX_CHECK))
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    started = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - started
    print(f"{path.name}: {seconds:.1f} s")

    kernel_prefix = "".join(o.get("text", "") for o in notebook.cells[0].outputs).strip()
    assert kernel_prefix == sys.prefix, f"the kernel ran {kernel_prefix!r}, not this environment ({sys.prefix})"
    errors = _errors(notebook)
    assert not errors, f"{path.name}:\n" + "\n\n".join(errors)
    unexecuted = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and c.execution_count is None]
    assert not unexecuted, f"{path.name}: cells {unexecuted} did not run"
