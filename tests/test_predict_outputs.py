"""predict's outputs: overlays on one colour scale per model (fixed by the fit's normal statistics),
the colour bar, score and decision on each overlay, and the exit status when nothing was scored."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from spotdiff.cli import main
from spotdiff.detect import PaDiM
from spotdiff.detect.colour import NORMAL_SAMPLE, colour_scale, render_overlay
from spotdiff.detect.store import CONFIG_FILE, MANIFEST_FILE, sha256_file

SIZE = 48


def _normal_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.45 + 0.04 * torch.randn(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "padim"
    PaDiM(arch="resnet18", d=20).fit([{"image": x} for x in _normal_images(20)]).save(out)
    return out


@pytest.fixture(scope="module")
def low_and_high(tmp_path_factory):
    """A normal-looking image and the same kind of image with a bright square defect, as PNGs."""
    folder = tmp_path_factory.mktemp("images")
    images = _normal_images(2, seed=1)
    images[1, :, 12:28, 12:28] = 1.0
    paths = []
    for name, x in zip(("low", "high"), images, strict=True):
        paths.append(folder / f"{name}.png")
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(paths[-1])
    return paths


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _heat_part(png) -> np.ndarray:
    """The heat-map panel of an overlay (where `overlay_layout` puts it, SIZE x SIZE images)."""
    from spotdiff.detect.colour import overlay_layout

    with Image.open(png) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float64)
    top, left, h, w = overlay_layout(SIZE, SIZE)["heat"]
    return arr[top : top + h, left : left + w]


def test_fit_records_normal_statistics_and_the_scale_is_fixed_by_them(model_dir):
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    stats = config["normal_maps"]
    assert stats["images"] == NORMAL_SAMPLE and stats["map_median"] < stats["map_p99"] <= stats["score_max"] + 1e-6
    model = PaDiM.load(model_dir)
    scale = colour_scale(model)
    assert scale.vmin == pytest.approx(stats["map_median"])
    assert scale.vmax == pytest.approx(stats["map_median"] + 2 * (stats["score_max"] - stats["map_median"]))
    assert colour_scale(model, threshold=3.0).vmax == 6.0  # a given threshold sits mid-scale


def test_low_score_overlay_is_cooler_and_never_rescaled_per_image(model_dir, low_and_high, tmp_path):
    both, alone = tmp_path / "both", tmp_path / "alone"
    assert main(["--quiet", "predict", str(model_dir), *map(str, low_and_high), "--out", str(both)]) == 0
    rows = {r["path"]: r for r in _rows(both / "scores.csv")}
    low, high = (rows[str(p)] for p in low_and_high)
    assert float(low["score"]) < float(high["score"])
    redness = {
        k: (lambda a: float((a[..., 0] - a[..., 2]).mean()))(_heat_part(r["overlay"]))
        for k, r in (("low", low), ("high", high))
    }
    assert redness["low"] < redness["high"] - 10  # jet: blue = low, red = high
    # the low image's overlay does not depend on what else is scored with it: one scale per model
    assert main(["--quiet", "predict", str(model_dir), str(low_and_high[0]), "--out", str(alone)]) == 0
    alone_overlay = _rows(alone / "scores.csv")[0]["overlay"]
    diff = np.abs(_heat_part(alone_overlay) - _heat_part(low["overlay"]))
    assert diff.mean() < 0.5 and diff.max() <= 8  # batch-size float noise, one step of the colour map


def test_overlay_carries_colour_bar_score_and_decision():
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    amap = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    from spotdiff.detect.colour import ColourScale

    scale = ColourScale(0.0, 1.0, "test")
    plain = render_overlay(image, amap, scale, 0.7)
    decided = render_overlay(image, amap, scale, 0.7, threshold=0.5)
    from spotdiff.detect.colour import overlay_layout

    assert plain.shape[0] > SIZE and plain.shape[1] > 2 * SIZE  # title lines above; original, heat map, bar
    top, left, h, w = overlay_layout(SIZE, SIZE)["original"]
    np.testing.assert_array_equal(decided[top : top + h, left : left + w], image)  # the original beside the map
    top, left, h, w = overlay_layout(SIZE, SIZE)["bar"]
    bar = decided[top : top + h, left : left + w]
    assert bar[0, 0, 0] > bar[0, 0, 2] and bar[-1, 0, 2] > bar[-1, 0, 0]  # red on top, blue at the bottom
    assert not np.array_equal(plain, decided)  # the decision (and threshold mark) differ


def test_old_model_dir_without_statistics_loads_and_predict_fixes_the_scale_once(
    model_dir, low_and_high, tmp_path, capsys
):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    config = json.loads((old / CONFIG_FILE).read_text())
    del config["normal_maps"]
    (old / CONFIG_FILE).write_text(json.dumps(config))
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    manifest["files"][CONFIG_FILE] = sha256_file(old / CONFIG_FILE)
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert PaDiM.load(old).normal_maps_ is None
    assert main(["predict", str(old), *map(str, low_and_high), "--out", str(tmp_path / "p")]) == 0
    assert capsys.readouterr().err.count("first batch fix the overlays' colour scale") == 1


def test_predict_exits_non_zero_when_nothing_was_scored(model_dir, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["--quiet", "predict", str(model_dir), str(broken), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "no image could be scored" in err and str(broken) in err
    assert _rows(tmp_path / "p" / "scores.csv")[0]["error"]  # the reason stays in the CSV
