"""The operator's page in headless Chromium: latest decisions with overlays, flagged first, refreshed live."""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from test_report_browser import _chromium, chromium  # noqa: F401  (chromium is a fixture)
from test_serve import model_dir, sample_pngs  # noqa: F401  (model_dir is a fixture)
from test_serve_kill import free_port

from spotdiff.serve import AuditLog, ServeConfig, create_app, load_models

pytestmark = pytest.mark.browser


@contextmanager
def running(app, port: int):
    """uvicorn serving ``app`` on 127.0.0.1:``port`` in a thread."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_operator_page_shows_flagged_parts_first_with_overlays(chromium, model_dir, tmp_path):  # noqa: F811
    app = create_app(load_models([str(model_dir)]), AuditLog(tmp_path / "audit.jsonl"), ServeConfig())
    with running(app, free_port()) as url:
        decisions = []
        for data in sample_pngs():  # two normal-looking images first, then two with a red square
            r = httpx.post(f"{url}/v1/models/padim/predict", content=data, headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
            decisions.append(r.json()["decision"])
        assert "anomalous" in decisions and "normal" in decisions

        run = _chromium(chromium, tmp_path, "--virtual-time-budget=4000", "--dump-dom", url + "/")
        dom = run.stdout
        cards = re.findall(
            r'<div class="card (\w+)" data-decision="(\w+)"[^>]*>(.*?)</div>\s*(?=<div class="card|</main>)',
            dom,
            flags=re.DOTALL,
        )
        assert len(cards) == 4, f"cards: {cards}\nchromium said:\n{run.stderr[-2000:]}"
        shown = [c[1] for c in cards]
        assert shown == sorted(decisions, key=lambda d: d != "anomalous"), shown  # flagged first
        assert all('src="blob:' in c[2] for c in cards)  # every card carries its overlay
        assert "flagged" in re.search(r'<span id="status"[^>]*>(.*?)</span>', dom, flags=re.DOTALL).group(1)
        polls = httpx.get(f"{url}/metrics").text
        count = int(re.search(r'spotdiff_requests_total\{route="/v1/decisions",status="200"\} (\d+)', polls).group(1))
        assert count >= 2, "the page did not refresh"  # one poll per second of (virtual) time

        shot = tmp_path / "page.png"
        _chromium(
            chromium,
            tmp_path,
            "--virtual-time-budget=3000",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            url + "/",
        )
        pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
        red = (pixels[..., 0] > 150) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)  # the flagged cards' borders
        assert red.mean() > 0.002, "no red (flagged) card visible"
