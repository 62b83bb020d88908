"""Notebook figures with a static PNG: after `use_png_figures()`, `fig.show()` outputs plotly's interactive
bundle and an `image/png` of the figure.

Jupyter shows the interactive figure; viewers without a kernel or plotly.js (GitHub's) show the PNG. The PNG
comes from kaleido's Chromium, started once per kernel. Without a browser, or when an export fails or runs past
`timeout_s` (a browser can hang on a loaded machine), the figure is shown without a PNG and later figures skip
the export: the notebook neither fails nor blocks on it (`scripts/refresh_notebooks.py` refuses to store a figure
without its PNG).
"""

from __future__ import annotations

import base64
import threading

import plotly.io as pio
from plotly.io.base_renderers import MimetypeRenderer

from workbench.pipeline.report import find_browser

PNG_WIDTH, PNG_HEIGHT = 800, 500  # layout pixels, scale 1, where the figure sets no width or height
RENDERER = "workbench_png"


class PngRenderer(MimetypeRenderer):
    """Renders `image/png` only; combined with `plotly_mimetype` it adds the PNG to the interactive figure."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.state = {"working": None}  # shared with the copy plotly makes per figure; None until the first figure

    def to_mimebundle(self, fig_dict: dict) -> dict:
        if self.state["working"] is None:
            self.state["working"] = find_browser() is not None
            if self.state["working"]:
                import kaleido

                kaleido.start_sync_server(silence_warnings=True)
        png = self._export(fig_dict) if self.state["working"] else None
        self.state["working"] = png is not None
        return {"image/png": base64.b64encode(png).decode()} if png else {}

    def _export(self, fig_dict: dict) -> bytes | None:
        """The PNG, or None when kaleido failed or took longer than `timeout_s`."""
        import kaleido

        layout = fig_dict.get("layout", {})
        opts = dict(format="png", width=layout.get("width") or PNG_WIDTH, height=layout.get("height") or PNG_HEIGHT,
                    scale=1)
        result = []

        def export():
            try:
                result.append(kaleido.calc_fig_sync(fig_dict, opts=opts))
            except Exception:  # no PNG, as without a browser
                pass

        worker = threading.Thread(target=export, daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        return result[0] if result else None


def use_png_figures(timeout_s: float = 60) -> None:
    """Make `fig.show()` output the interactive figure plus its PNG in this kernel (plotly's default renderer)."""
    pio.renderers[RENDERER] = PngRenderer(timeout_s)
    pio.renderers.default = f"plotly_mimetype+{RENDERER}"
