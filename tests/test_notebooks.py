"""The notebooks are stored with their outputs, and re-executing them must reproduce their checks.

`scripts/refresh_notebooks.py` executes the notebooks and stores them with their outputs (each figure both as
plotly's interactive bundle and as a static PNG). A stored notebook must be complete: every code cell executed in
order (1, 2, ...) with outputs, no errors, every figure with its PNG.

The `notebooks`-marked test re-executes each notebook the way the script does (a fresh kernel of this
interpreter, OMP_NUM_THREADS=1 unless set, a temporary working directory, so nothing is written into the
repository), fails on any error or unexecuted cell, and compares the checks cell with its stored output. Every
notebook ends with that cell: its assertions, then a short summary of the key numbers, rounded, and "... checks
passed". Only the checks cell is compared: the other outputs hold unrounded floats and PNG bytes that may vary
with the machine, and no compared output prints a timing (durations, object addresses and negative zeros are
normalised all the same). The six notebooks take a few minutes on a CPU; select them with `pytest -m notebooks`.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "refresh_notebooks.py"
_spec = importlib.util.spec_from_file_location("refresh_notebooks", SCRIPT)
refresh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(refresh)

NOTEBOOKS = sorted(refresh.NOTEBOOK_DIR.glob("*.ipynb"))
VARYING = [  # (pattern, replacement) applied to compared text
    (re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s|min)\b"), "<duration>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "0x..."),
    (re.compile(r"-(0(?:\.0+)?)(?![\d.])"), r"\1"),  # -0.00 is 0.00
]


def checks_text(cell) -> str:
    """A cell's stdout and plain-text results, normalised (VARYING; trailing spaces)."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream" and output.name == "stdout":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.data.get("text/plain", ""))
    text = "".join(parts)
    for pattern, replacement in VARYING:
        text = pattern.sub(replacement, text)
    return "\n".join(line.rstrip() for line in text.splitlines())


def stale_checks(name: str, stored, executed) -> str:
    """"" when the checks cell (the last code cell) prints the same in both notebooks, else a message naming the
    notebook and the cell, with a diff."""
    index = max(i for i, cell in enumerate(stored.cells) if cell.cell_type == "code")
    old, new = checks_text(stored.cells[index]), checks_text(executed.cells[index])
    if old == new:
        return ""
    diff = "\n".join(difflib.unified_diff(old.splitlines(), new.splitlines(), "stored", "re-executed", lineterm=""))
    return (f"{name}: the stored output of the checks cell (cell {index}) is stale; "
            f"run scripts/refresh_notebooks.py {Path(name).stem}\n{diff}")


def stored_problems(notebook) -> list[str]:
    """What makes a stored notebook incomplete: a code cell not run, run out of order or without outputs, an
    error output, a figure without its PNG."""
    code = [(index, cell) for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    counts = [cell.execution_count for _, cell in code]
    problems = refresh.errors(notebook) + refresh.missing_pngs(notebook)
    if None not in counts and counts != list(range(1, len(code) + 1)):
        problems.append(f"execution counts {counts}: not run top to bottom in a fresh kernel")
    return problems + [f"cell {index} has no outputs" for index, cell in code if not cell.outputs]


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == [
        "01_audit.ipynb",
        "02_attribution.ipynb",
        "03_patching_and_heads.ipynb",
        "04_pruning_and_anomalies.ipynb",
        "05_generalization.ipynb",
        "06_bias_types.ipynb",
        "07_directions.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_stored_with_outputs(path: Path):
    problems = stored_problems(nbformat.read(path, as_version=4))
    assert not problems, f"{path.name} (run scripts/refresh_notebooks.py {path.stem}):\n" + "\n".join(problems)


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_and_checks_match(path: Path):
    stored = nbformat.read(path, as_version=4)
    executed = copy.deepcopy(stored)
    started = time.perf_counter()
    refresh.execute(executed)
    print(f"{path.name}: {time.perf_counter() - started:.1f} s")
    errors = refresh.errors(executed)
    assert not errors, f"{path.name}:\n" + "\n\n".join(errors)
    stale = stale_checks(path.name, stored, executed)
    assert not stale, stale


# ---------------------------------------------------------------- the comparison on hand-made notebooks


def _notebook(checks: str, timing: str = "1.2 s", run: bool = True):
    """A markdown cell, a cell printing a read-out time and a checks cell printing `checks`; un-executed
    unless `run`."""
    new = nbformat.v4

    def cell(source, count, text):
        outputs = [new.new_output("stream", name="stdout", text=text)] if run else []
        return new.new_code_cell(source, execution_count=count if run else None, outputs=outputs)

    return new.new_notebook(cells=[new.new_markdown_cell("# A notebook"),
                                   cell("print('read-out')", 1, f"read-out in {timing}\n"),
                                   cell("assert True\nprint('summary')", 2, checks)])


def test_stale_checks_identical_and_varying_outputs_pass():
    stored = _notebook("SMD +0.12, done in 0.8 s\nall checks passed\n")
    assert stale_checks("x.ipynb", stored, copy.deepcopy(stored)) == ""
    timing_only = _notebook("SMD +0.12, done in 13 s \nall checks passed\n", timing="3.4 s")
    assert stale_checks("x.ipynb", stored, timing_only) == ""
    assert stale_checks("x.ipynb", _notebook("SMD -0.00 <Figure at 0x7f3a10>\n"),
                        _notebook("SMD 0.00 <Figure at 0x7f4b22>\n")) == ""


def test_stale_checks_changed_output_fails():
    stored = _notebook("SMD +0.12\nall checks passed\n")
    message = stale_checks("x.ipynb", stored, _notebook("SMD +0.15\nall checks passed\n"))
    assert "x.ipynb" in message and "cell 2" in message and "run scripts/refresh_notebooks.py x" in message
    assert "-SMD +0.12" in message and "+SMD +0.15" in message
    assert stale_checks("x.ipynb", _notebook("", run=False), stored)  # stored without outputs


def test_stored_problems():
    assert stored_problems(_notebook("all checks passed\n")) == []
    assert stored_problems(_notebook("all checks passed\n", run=False)) == ["cell 1 did not run", "cell 2 did not run",
                                                                             "cell 1 has no outputs",
                                                                             "cell 2 has no outputs"]
    reordered = _notebook("all checks passed\n")
    reordered.cells[1].execution_count = 3
    assert stored_problems(reordered) == ["execution counts [3, 2]: not run top to bottom in a fresh kernel"]
    figure = _notebook("all checks passed\n")
    figure.cells[1].outputs = [nbformat.v4.new_output("display_data", data={refresh.PLOTLY_MIME: {"data": []}})]
    assert stored_problems(figure) == [
        "cell 1: a figure without its PNG (no Chromium, or the export failed or timed out)"]
    failed = _notebook("all checks passed\n")
    failed.cells[2].outputs.append(nbformat.v4.new_output("error", ename="AssertionError", evalue="", traceback=[]))
    assert stored_problems(failed) == ["cell 2: AssertionError: \n"]


# ---------------------------------------------------------------- figures' PNG (kaleido replaced)


def test_png_figures(monkeypatch: pytest.MonkeyPatch):
    import kaleido
    import plotly.graph_objects as go
    import plotly.io as pio

    from workbench.pipeline import notebook

    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)  # restored after the test
    notebook.use_png_figures()
    assert pio.renderers.default == "plotly_mimetype+workbench_png"
    figure = go.Figure(go.Scatter(x=[1, 2], y=[2, 1])).to_dict()
    calls = []
    monkeypatch.setattr(kaleido, "start_sync_server", lambda **kwargs: None)
    monkeypatch.setattr(kaleido, "calc_fig_sync", lambda fig, opts: calls.append(opts) or b"png")
    monkeypatch.setattr(notebook, "find_browser", lambda: "chromium")
    renderer = notebook.PngRenderer(timeout_s=60)
    assert copy.copy(renderer).to_mimebundle(figure) == {"image/png": "cG5n"}  # plotly copies it per figure
    assert calls == [dict(format="png", width=800, height=500, scale=1)]

    monkeypatch.setattr(kaleido, "calc_fig_sync", lambda fig, opts: calls.append(opts) or time.sleep(1))
    renderer = notebook.PngRenderer(timeout_s=0.05)
    assert copy.copy(renderer).to_mimebundle(figure) == {}  # past its time limit: no PNG
    assert copy.copy(renderer).to_mimebundle(figure) == {} and len(calls) == 2  # and no further try

    monkeypatch.setattr(notebook, "find_browser", lambda: None)
    assert notebook.PngRenderer(timeout_s=60).to_mimebundle(figure) == {} and len(calls) == 2
