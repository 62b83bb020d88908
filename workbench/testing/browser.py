"""A page's horizontal overflow at a given window width, measured in headless Chromium (tests of the report)."""

from __future__ import annotations

import html
import json
import re
import subprocess
import tempfile
from pathlib import Path

from workbench.pipeline.report import find_browser

MEASURE = """<script>
window.addEventListener('load', () => {
  const width = document.documentElement.clientWidth;
  const clipped = [];
  for (const element of document.querySelectorAll('body *')) {
    const box = element.getBoundingClientRect();
    if (box.width > 0 && box.right > width + 1) {
      clipped.push(element.tagName.toLowerCase() + ': ' + (element.textContent || '').trim().slice(0, 60));
    }
  }
  document.body.setAttribute('data-overflow', JSON.stringify(
    {width: width, page_width: document.documentElement.scrollWidth, clipped: clipped.slice(0, 20)}));
});
</script>"""


def horizontal_overflow(page: Path, width: int = 1280, timeout_s: float = 120) -> dict:
    """{"width", "page_width", "clipped"}: the window's width, the page's scroll width and the first elements
    whose right edge lies past the window (tag: text), for `page` opened at `width` px in headless Chromium."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no Chrome/Chromium binary found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as folder:
        measured = Path(folder) / "page.html"
        measured.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},900",
                              "--virtual-time-budget=20000", "--dump-dom", measured.as_uri()],
                             capture_output=True, text=True, timeout=timeout_s).stdout
    found = re.search(r'data-overflow="([^"]*)"', dom)
    if found is None:
        raise RuntimeError(f"Chromium did not measure {page} (no data-overflow attribute in its DOM)")
    return json.loads(html.unescape(found.group(1)))
