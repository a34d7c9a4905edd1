"""Load: ``spotdiff predict`` on 2,000 images streams in batches (peak memory does not grow with
the number of images) and reports per-image failures without stopping the batch."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import BAD_IMAGES, OBJECT, cli_command, cli_env, noise_jpeg, simple_tree

from spotdiff.cli import main

N_SMALL, N_LARGE = 500, 2000
# Holding every input at once would cost 1,500 x (3x64x64 image + 64x64 map) x 4 bytes = 98 MB more
# for the larger run; streaming costs one batch whatever the count. Measured on the dev machine:
# +20 MB from 500 to 2,000 images in batches of 32; +1.1 GB for 2,000 images in one batch.
MAX_GROWTH_MB = 50


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = simple_tree(tmp_path_factory.mktemp("visa"), n_train=8, n_good=1, n_bad=1, size=32)
    out = tmp_path_factory.mktemp("model") / "padim"
    assert (
        main(
            [
                "--quiet",
                "fit",
                "--model",
                "padim",
                "--data",
                str(root),
                "--object",
                OBJECT,
                "--arch",
                "resnet18",
                "--image-size",
                "64",
                "--d",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def _image_folder(folder: Path, n: int, broken: dict[int, str]) -> Path:
    """``n`` 32x32 JPEGs; the indices in ``broken`` hold that kind of broken file instead."""
    folder.mkdir()
    base = noise_jpeg(0)
    for i in range(n):
        if i in broken:
            suffix, make = BAD_IMAGES[broken[i]]
            (folder / f"{i:05d}{suffix}").write_bytes(make())
        else:
            (folder / f"{i:05d}.JPG").write_bytes(base if i % 7 else noise_jpeg(i))
    return folder


@pytest.mark.slow
def test_predict_2000_images_keeps_memory_flat_and_reports_failures(model_dir, tmp_path):
    broken = {13: "zero_bytes", 1001: "text_named_jpg", 1998: "truncated_jpeg"}
    runs = {}
    for n in (N_SMALL, N_LARGE):
        images = _image_folder(tmp_path / f"images_{n}", n, {i: k for i, k in broken.items() if i < n})
        out = tmp_path / f"pred_{n}"
        proc = subprocess.Popen(
            cli_command("predict", model_dir, images, "--out", out, "--no-overlays", "--batch-size", "32"),
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs[n] = (proc, images, out)
    peak_mb = {}
    for n, (proc, images, out) in runs.items():
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
        assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]  # 1: completed, error rows
        peak_mb[n] = usage.ru_maxrss / 1024
        with open(out / "scores.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == n
        failed = {r["path"] for r in rows if r["error"]}
        expected = {str(p) for p in images.iterdir() if int(p.name[:5]) in broken}
        assert failed == expected
        for path in expected:
            assert path in stderr
        assert all(np.isfinite(float(r["score"])) for r in rows if not r["error"])
        assert f"scored {n - len(expected)} image(s), {len(expected)} failed" in stdout
    growth = peak_mb[N_LARGE] - peak_mb[N_SMALL]
    assert growth < MAX_GROWTH_MB, (
        f"peak RSS {peak_mb[N_SMALL]:.0f} MB at {N_SMALL} images, {peak_mb[N_LARGE]:.0f} MB at {N_LARGE}"
    )
