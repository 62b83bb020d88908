"""Saving figures and writing the run report, readable offline.

HTML output embeds plotly.js (never a CDN link: the machines here have no internet). PNG export
goes through kaleido, which drives a Chrome/Chromium binary; without one (Debian: `apt-get install
chromium`) the PNG is skipped with a message. Chrome is never downloaded. Every file is written to a
temporary file first and moved into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from workbench.pipeline.runstore import atomic_write

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PNG_WIDTH, PNG_HEIGHT, PNG_SCALE = 1000, 600, 2
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
CSS = """
body { font-family: Arial, 'Liberation Sans', 'DejaVu Sans', sans-serif; max-width: 1150px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #0072B2; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
nav li { margin: .1em 0; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: 12px; max-width: 100%; }
caption { text-align: left; font-weight: bold; padding: .3em 0; }
th, td { padding: .25em .4em; border-bottom: 1px solid #e5e5e5; overflow-wrap: anywhere; }
.figure { max-width: 100%; overflow: hidden; }
img { max-width: 100%; }
th { background: #f4f6f8; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f4f6f8; padding: 0 .2em; }
.figure { margin: 1em 0 2em; }
"""


# ---------------------------------------------------------------- files


def find_browser() -> str | None:
    """Path of a Chrome/Chromium binary that kaleido can use, or None; never downloads one.

    Looks at BROWSER_PATH, the usual executable names on PATH and kaleido's own search; when the
    binary is found only on PATH, sets BROWSER_PATH so that kaleido uses it. Without kaleido (and its
    choreographer) installed there is no PNG export: None.
    """
    try:
        from choreographer.browsers.chromium import Chromium
    except ImportError:
        return None
    candidates = [os.environ.get("BROWSER_PATH")] + [shutil.which(name) for name in BROWSER_NAMES]
    found = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    kaleido_found = Chromium.find_browser(skip_local=False)
    if found and not kaleido_found:
        os.environ["BROWSER_PATH"] = found
    return found or kaleido_found


def save_figure(fig: go.Figure, out_dir: str | Path, stem: str) -> dict:
    """Write `<stem>.html` (plotly.js embedded) and, when a browser is available, `<stem>.png`
    (`save_figures` for one figure).

    Returns {"html": Path, "png": Path or None, "message": "" or why the PNG was skipped}.
    """
    return save_figures({stem: fig}, out_dir)[stem]


def save_figures(figures: dict[str, go.Figure], out_dir: str | Path,
                 timeout_s: float | None = None) -> dict[str, dict]:
    """Write `<stem>.html` for every figure and, when a browser is available, `<stem>.png`, all PNGs in one
    child process (`png_export`) that is killed with its browser after `timeout_s` (default: 60 s plus 15 s
    per figure). Returns save_figure's dict per stem; a PNG that could not be made says why in "message"."""
    out_dir = Path(out_dir)
    results = {stem: {"html": atomic_write(out_dir / f"{stem}.html",
                                           fig.to_html(include_plotlyjs=True, config=PLOT_CONFIG)),
                      "png": None, "message": ""} for stem, fig in figures.items()}
    if find_browser() is None:
        for stem, result in results.items():
            result["message"] = f"PNG skipped for {stem}: no Chrome/Chromium found (install Debian's `chromium`)"
        return results
    timeout_s = timeout_s if timeout_s is not None else 60 + 15 * len(figures)
    with tempfile.TemporaryDirectory() as folder:
        for stem, fig in figures.items():
            (Path(folder) / f"{stem}.json").write_text(fig.to_json())
        failure = _run_export(Path(folder), timeout_s)
        for stem, result in results.items():
            made = Path(folder) / f"{stem}.png"
            if made.exists():
                result["png"] = atomic_write(out_dir / f"{stem}.png", made.read_bytes())
            else:
                result["message"] = f"PNG skipped for {stem}: export failed ({failure or 'no file written'})"
    return results


def _run_export(folder: Path, timeout_s: float) -> str:
    """Run png_export on `folder` in its own process group; "" on success, else why it failed (a run past
    `timeout_s` is killed, browser included)."""
    command = [sys.executable, "-m", "workbench.pipeline.png_export", str(folder)]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        _, errors = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return f"timed out after {timeout_s:g} s"
    if child.returncode:
        last = (errors or "").strip().splitlines()[-1:] or [f"exit code {child.returncode}"]
        return last[0]
    return ""


# ---------------------------------------------------------------- tables


def format_cell(value) -> str:
    """A table cell: floats with 4 significant digits, missing values as an empty cell."""
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{value:.4g}"
    if value is None or value is pd.NA:
        return ""
    return str(value)


def _numeric(df: pd.DataFrame) -> list[bool]:
    """Per column: is it numeric (and so right-aligned)?"""
    return [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of df (no index), numeric columns right-aligned."""
    def cell(value) -> str:
        return format_cell(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---:" if num else "---" for num in _numeric(df)) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


INTERVALS = [("{}", "{}_low", "{}_high"), ("{}", "{}_ci_low", "{}_ci_high"), ("removed_minus_random", "difference_low",
             "difference_high"), ("bias_before", "bias_ci_low", "bias_ci_high"), ("signed_bias", "signed_ci_low",
             "signed_ci_high"), ("plant_left", "plant_left_low", "plant_left_high")]
CI_OWNERS = ["reduction_pct", "smd", "mean_abs_smd", "achieved_smd"]
"""Columns whose 95 % interval the HTML tables show in the same cell; the bare ci_low / ci_high belong to the first
of CI_OWNERS that the table has."""


def merge_intervals(df: pd.DataFrame) -> pd.DataFrame:
    """df with each estimate's interval columns folded into its cell as "estimate [low, high]" (HTML tables: fewer
    columns, so that a table fits the page)."""
    triples = [tuple(part.format(column) for part in parts) for column in df.columns for parts in INTERVALS
               if parts[0] in ("{}", column)]
    owner = next((column for column in CI_OWNERS if column in df), None)
    if owner:
        triples.append((owner, "ci_low", "ci_high"))
    merged = df.copy()
    for estimate, low, high in triples:
        columns = (estimate, low, high)
        if set(columns) <= set(merged) and all(pd.api.types.is_numeric_dtype(merged[c]) for c in columns):
            merged[estimate] = [format_cell(e) + (f" [{format_cell(a)}, {format_cell(b)}]"
                                                  if pd.notna(a) and pd.notna(b) else "")
                                for e, a, b in zip(merged[estimate], merged[low], merged[high])]
            merged = merged.drop(columns=[low, high])
    return merged


def to_html_table(df: pd.DataFrame, caption: str) -> str:
    """An HTML table of df (no index) with a caption, numeric cells right-aligned, intervals in their estimate's
    cell (merge_intervals)."""
    df = merge_intervals(df)
    numeric = _numeric(df)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = [
        "<tr>" + "".join(
            f'<td class="num">{html.escape(format_cell(v))}</td>' if num else f"<td>{html.escape(format_cell(v))}</td>"
            for v, num in zip(row, numeric)
        ) + "</tr>"
        for row in df.itertuples(index=False)
    ]
    return (f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


# ---------------------------------------------------------------- text


def text_to_html(text: str) -> str:
    """Markdown-ish text to HTML: blank-line paragraphs, '- ' bullet lists, `code` spans."""
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text or "") if b.strip()]
    return "\n".join(_block_to_html(block) for block in blocks)


def _inline(text: str) -> str:
    """Escape HTML and turn `code` into <code>, **bold** into <strong>."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _block_to_html(block: str) -> str:
    """One paragraph, or a bullet list when every line starts with '- '."""
    lines = block.splitlines()
    if all(line.lstrip().startswith("- ") for line in lines):
        items = "".join(f"<li>{_inline(line.lstrip()[2:])}</li>" for line in lines)
        return f"<ul>{items}</ul>"
    return f"<p>{_inline(' '.join(line.strip() for line in lines))}</p>"


# ---------------------------------------------------------------- report


def _anchor(index: int) -> str:
    """The id of section number index."""
    return f"section-{index}"


def _section_html(index: int, section: dict) -> str:
    """One section: heading, text, figures, then tables (plotly.js is loaded once in <head>)."""
    parts = [f'<h2 id="{_anchor(index)}">{html.escape(section["heading"])}</h2>', text_to_html(section.get("text", ""))]
    parts += [
        '<div class="figure">' + fig.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG) + "</div>"
        for fig in section.get("figures", [])
    ]
    for caption, df, *note in section.get("tables", []):
        parts += [to_html_table(df, caption), *(text_to_html(n) for n in note)]
    return "\n".join(parts)


def report_html(title: str, sections: list[dict]) -> str:
    """The whole report as one self-contained HTML page."""
    toc = "".join(f'<li><a href="#{_anchor(i)}">{html.escape(s["heading"])}</a></li>' for i, s in enumerate(sections))
    body = "\n".join(_section_html(i, s) for i, s in enumerate(sections))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<style>{CSS}</style>\n<script type="text/javascript">{get_plotlyjs()}</script></head>\n'
        f"<body><h1>{html.escape(title)}</h1><nav><ul>{toc}</ul></nav>\n{body}\n</body></html>\n"
    )


def report_markdown(title: str, sections: list[dict]) -> str:
    """The report's headings, text and tables as markdown (figures live in report.html)."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section['heading']}", "", (section.get("text") or "").strip(), ""]
        for caption, df, *note in section.get("tables", []):
            lines += [f"**{caption}**", "", to_markdown(df), "", *(f"{n.strip()}\n" for n in note)]
        if section.get("figures"):
            lines += [f"_{len(section['figures'])} figure(s): see report.html._", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, title: str, sections: list[dict]) -> tuple[Path, Path]:
    """Write run_dir/report.html (self-contained) and run_dir/report.md; return their paths.

    Each section is {"heading": str, "text": str, "tables": [(caption, DataFrame[, note])], "figures":
    [go.Figure]}; text, tables, a table's note (text shown below it) and figures are optional.
    """
    run_dir = Path(run_dir)
    html_path = atomic_write(run_dir / "report.html", report_html(title, sections))
    md_path = atomic_write(run_dir / "report.md", report_markdown(title, sections))
    return html_path, md_path
