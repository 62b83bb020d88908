"""Write PNGs of plotly figures stored as JSON, in one kaleido session: `python -m workbench.pipeline.png_export DIR`.

Run as a child process by `report.save_figures`, which kills it (with the browser it started) when it runs past
its time limit: kaleido's own timeout covers the rendering but not the browser's start, which can hang.
Each DIR/<stem>.json becomes DIR/<stem>.png at the figure's own size (report.PNG_WIDTH x PNG_HEIGHT where it
has none), scale report.PNG_SCALE.
"""

from __future__ import annotations

import sys
from pathlib import Path

import plotly.io as pio


def export(folder: Path) -> None:
    from workbench.pipeline.report import PNG_HEIGHT, PNG_SCALE, PNG_WIDTH

    specs = sorted(folder.glob("*.json"))
    figures = [pio.from_json(path.read_text()) for path in specs]
    pio.write_images(figures, [path.with_suffix(".png") for path in specs],
                     width=[f.layout.width or PNG_WIDTH for f in figures],
                     height=[f.layout.height or PNG_HEIGHT for f in figures], scale=PNG_SCALE)


if __name__ == "__main__":
    export(Path(sys.argv[1]))
