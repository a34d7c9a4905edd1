"""``predict`` killed with SIGKILL midway keeps every image it scored, and ``--resume`` completes the
rest with the scores an uninterrupted run gives (issue 25, item 6)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image
from reliability_helpers import cli_command, cli_env

from spotdiff.detect import PaDiM

N_IMAGES = 400


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _data_lines(path) -> int:
    """Complete data lines in a scores file being appended to (0 when absent)."""
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_midway_keeps_scored_rows_and_resume_completes_identically(tmp_path):
    rng = np.random.default_rng(0)
    model = tmp_path / "model"
    train = [{"image": torch_image(rng)} for _ in range(6)]
    PaDiM(arch="resnet18", d=8, layers=["layer1"]).fit(train).save(model)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(90, 160, (32, 32, 3), dtype=np.uint8)).save(images / f"{i:04d}.png")
    args = ("predict", model, images, "--threshold", "50", "--batch-size", "1", "--io-threads", "1")
    reference = subprocess.Popen(
        cli_command(*args, "--out", tmp_path / "reference"),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    out = tmp_path / "killed"
    victim = subprocess.Popen(
        cli_command(*args, "--out", out), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    partial = out / "scores.partial.csv"
    deadline = time.monotonic() + 240
    while _data_lines(partial) < 20 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "predict finished before it could be killed: use more images"
    assert not (out / "scores.csv").exists()  # the file says it is partial by its name
    before = _rows(partial)
    assert 20 <= len(before) < N_IMAGES
    for row in before:  # every kept row names files that exist and a finite score
        assert np.isfinite(float(row["score"])) and os.path.isfile(row["overlay"])

    resumed = subprocess.run(
        cli_command(*args, "--out", out, "--resume"),
        check=False,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    final = _rows(out / "scores.csv")
    expected = _rows(tmp_path / "reference" / "scores.csv")
    assert not partial.exists() and len(final) == N_IMAGES
    assert [r["path"] for r in final] == [r["path"] for r in expected] == sorted(map(str, images.iterdir()))
    assert [r["score"] for r in final] == [r["score"] for r in expected]  # identical, digit for digit
    kept = {r["path"]: r for r in before}
    assert all(r == kept[r["path"]] for r in final if r["path"] in kept)  # the rows before the kill, unchanged
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [f"{i:04d}.png" for i in range(N_IMAGES)]


def torch_image(rng):
    import torch

    return torch.from_numpy(rng.integers(90, 160, (3, 32, 32)).astype(np.float32) / 255.0)
