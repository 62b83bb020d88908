"""The notebooks' checks, out of the reader's way: each notebook ends in one short cell that calls its module here,
which asserts what the notebook claims and prints a short summary of the key numbers (compared by
tests/test_notebooks.py)."""

from __future__ import annotations

from pathlib import Path

import nbformat


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def assert_quoted(notebook: str, quoted: dict[str, str], numbers: dict[str, float]) -> None:
    """Every number the notebook's text quotes (`quoted`: key -> the text as written, "-0.098", "41,365") is the
    computed one (`numbers`, same keys) within the text's rounding, and stands in the notebook's markdown (when
    the notebook is beside the package, as in a checkout), so the text cannot go stale silently."""
    assert set(quoted) == set(numbers), set(quoted) ^ set(numbers)
    stale = [f"{key}: the text says {text}, the notebook computes {float(numbers[key]):.6g}"
             for key, text in quoted.items()
             if abs(float(numbers[key]) - float(text.replace(",", ""))) > 0.5 * 10 ** -_decimals(text) + 1e-9]
    assert not stale, f"{notebook}: " + "; ".join(stale)
    path = Path(__file__).resolve().parents[2] / "notebooks" / f"{notebook}.ipynb"
    if path.exists():
        markdown = "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells
                             if cell.cell_type == "markdown")
        missing = sorted({text for text in quoted.values() if text not in markdown})
        assert not missing, f"{notebook}: numbers the checks quote but the text does not: {missing}"
