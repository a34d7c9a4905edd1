"""The HTML report renders in a real browser: headless Chromium screenshot and DOM dump."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import make_predictions, make_records

from spotdiff.report.html import report_sections, write_html_report
from spotdiff.report.tables import object_backbone_table, paper_tables

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.is_file():
        pytest.skip(f"headless Chromium not found at {CHROMIUM} (apt-get install chromium)")
    return CHROMIUM


def _chromium(binary: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(binary), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_report_renders_in_headless_chromium(chromium, tmp_path):
    records = make_records()
    tables = [*paper_tables(records), object_backbone_table(records)]
    page = tmp_path / "report.html"
    write_html_report(page, "spotdiff browser test", report_sections(tables, make_predictions(), gallery_size=4))
    url = page.resolve().as_uri()

    shot = tmp_path / "shot.png"
    run = _chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert shot.is_file(), f"no screenshot; chromium said:\n{run.stderr[-2000:]}"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 20, "screenshot looks blank (no contrast)"
    non_white = float((pixels < 240).mean())
    assert 0.02 < non_white < 0.9, f"non-white fraction {non_white:.3f}"

    run = _chromium(chromium, tmp_path, "--dump-dom", url)
    dom = run.stdout
    assert "<table" in dom, f"no DOM dumped; chromium said:\n{run.stderr[-2000:]}"
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", dom, flags=re.S)
    texts = [re.sub(r"<[^>]+>", "|", r) for r in rows]
    for table in tables:
        for cells in table.formatted_rows():
            assert any(all(f"|{c}|" in t for c in cells) for t in texts), cells
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', dom)
    assert len(srcs) == 2 * 3 + 3 * 3
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
