"""Execute notebooks top to bottom and store them with their outputs.

    .venv/bin/python scripts/refresh_notebooks.py            # every notebook in notebooks/
    .venv/bin/python scripts/refresh_notebooks.py 01 03      # those whose names start so

Each notebook runs in a fresh kernel of this interpreter (the `python3` kernelspec, checked) with
OMP_NUM_THREADS=1 unless set, QUIET, this checkout first on the kernel's PYTHONPATH and a temporary working
directory, so nothing is written into the repository; tests/test_notebooks.py runs them the same way. A notebook
is written only when every cell ran without error and every figure carries its PNG (which needs Chromium). The
stored file has no execution timestamps and execution counts 1, 2, ... from the fresh kernel, so a re-run with
unchanged code changes only the outputs that changed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
CELL_TIMEOUT_S = 600
PREFIX_CHECK = "import sys\nprint(sys.prefix)"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
# no progress bars, nor tqdm's warning that Jupyter has no widgets: outputs that vary with the machine
QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore:IProgress not found"}


def execute(notebook: nbformat.NotebookNode) -> None:
    """Run `notebook` top to bottom in place in a fresh kernel, keeping errors as outputs; raise RuntimeError
    when the kernel is not this interpreter's."""
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    notebook.cells.append(nbformat.v4.new_code_cell(PREFIX_CHECK))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # one torch thread: a thread per core oversubscribes a small shared CPU (the read-out ran 4-5 times slower)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=path, **QUIET)
    with tempfile.TemporaryDirectory() as workdir:
        client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=True,
                                record_timing=False, resources={"metadata": {"path": workdir}})
        client.execute(env=env)
    check = notebook.cells.pop()
    prefix = "".join(output.get("text", "") for output in check.outputs).strip()
    if prefix != sys.prefix:
        raise RuntimeError(f"the kernel ran {prefix!r}, not this environment ({sys.prefix})")


def errors(notebook: nbformat.NotebookNode) -> list[str]:
    """One message per code cell that raised an error or did not run."""
    messages = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        if cell.execution_count is None:
            messages.append(f"cell {index} did not run")
        for output in cell.outputs:
            if output.output_type == "error":
                trace = "\n".join(output.traceback)
                messages.append(f"cell {index}: {output.ename}: {output.evalue}\n{trace[-3000:]}")
    return messages


def missing_pngs(notebook: nbformat.NotebookNode) -> list[str]:
    """One message per figure output without its static PNG."""
    return [f"cell {index}: a figure without its PNG (no Chromium, or the export failed or timed out)"
            for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
            for output in cell.outputs if PLOTLY_MIME in output.get("data", {}) and "image/png" not in output.data]


def select(names: list[str]) -> list[Path]:
    """The notebooks whose file names start with each of `names` (a stem, file name or path); all without."""
    if not names:
        return sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    paths = []
    for name in names:
        found = sorted(NOTEBOOK_DIR.glob(f"{Path(name).stem}*.ipynb"))
        if not found:
            raise SystemExit(f"no notebook in {NOTEBOOK_DIR} starts with {Path(name).stem!r}")
        paths += found
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute notebooks and store them with their outputs.")
    parser.add_argument("names", nargs="*", help="notebooks (name prefixes, e.g. 01 or 03_patching); default all")
    failed = []
    for path in select(parser.parse_args(argv).names):
        notebook = nbformat.read(path, as_version=4)
        started = time.perf_counter()
        execute(notebook)
        problems = errors(notebook) + missing_pngs(notebook)
        if problems:
            failed.append(path.name)
            print(f"{path.name}: not stored\n" + "\n".join(problems), file=sys.stderr)
            continue
        for cell in notebook.cells:
            cell.metadata.pop("execution", None)
        nbformat.write(notebook, path)
        print(f"{path.name}: stored, {time.perf_counter() - started:.0f} s, {path.stat().st_size / 1024:.0f} KiB")
    if failed:
        print("not stored: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
