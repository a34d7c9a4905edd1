"""A newcomer's first hour (issue 18): overlays on one colour scale per model, anchored report
tables, thread count, and the small CLI fixes (warnings, exit status, skipped files listed once)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from spotdiff.cli import main
from spotdiff.data import synth
from spotdiff.detect import PaDiM
from spotdiff.detect.colour import NORMAL_SAMPLE, colour_scale, render_overlay
from spotdiff.detect.store import CONFIG_FILE, MANIFEST_FILE, sha256_file
from spotdiff.report.plots import Predictions
from spotdiff.report.tables import ResultRecord, metric_table, object_backbone_table
from spotdiff.threads import ENV_VAR, choose_threads, idle_cores

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


@pytest.fixture(scope="module")
def two_objects(tmp_path_factory):
    root = synth.generate(
        tmp_path_factory.mktemp("synth"), seed=0, scale=0.1, image_size=32, objects=["cashew_synth", "capsules_synth"]
    )
    return root


FIT = ["fit", "--model", "padim", "--arch", "resnet18", "--d", "16", "--image-size", "32"]


def test_test_warns_when_the_object_differs_from_the_fitted_one(two_objects, tmp_path, capsys):
    model = tmp_path / "m"
    assert main(["--quiet", *FIT, "--data", str(two_objects), "--object", "cashew_synth", "--out", str(model)]) == 0
    argv = ["--quiet", "test", str(model), "--data", str(two_objects)]
    assert main([*argv, "--object", "capsules_synth", "--out", str(tmp_path / "r1")]) == 0
    assert "fitted on object 'cashew_synth', not 'capsules_synth'" in capsys.readouterr().err
    assert main([*argv, "--object", "cashew_synth", "--out", str(tmp_path / "r2")]) == 0
    assert "fitted on object" not in capsys.readouterr().err
    test_set = json.loads((tmp_path / "r2" / "metrics.json").read_text())["test_set"]
    assert test_set["normal"] > 0 and test_set["anomalous"] > 0 and test_set["pixels"] > test_set["anomalous_pixels"]


def test_fit_skip_bad_names_each_skipped_file_once(two_objects, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(two_objects, root)
    bad = sorted((root / "cashew_synth" / "Data" / "Images" / "Normal").iterdir())[0]
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    argv = [*FIT, "--data", str(root), "--object", "cashew_synth", "--out", str(tmp_path / "m"), "--skip-bad"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count(bad.name) == 1 and "skipped 1 of" in err
    assert main(["--quiet", *argv]) == 0
    assert capsys.readouterr().err.count(bad.name) == 1  # still named, once, with --quiet


def test_pretrain_caps_batch_by_the_data_and_workers_by_the_cores(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--method",
                "simsiam",
                "--spd",
                "--arch",
                "resnet18",
                "--steps",
                "1",
                "--batch-size",
                "512",
                "--image-size",
                "32",
                "--workers",
                "4096",
                "--data",
                str(images),
                "--out",
                str(run),
                "--set",
                "hparams.blend_area=[0.04, 0.08]",
                "--set",
                "hparams.blend_aspect=[0.5, 2.0]",
            ]
        )
        == 0
    )  # SmoothBlend at 32 px
    err = capsys.readouterr().err
    assert "batch size 512 capped at 6" in err and "workers capped at" in err
    assert "pretrain simsiam+spd" in err  # the progress bar names the run
    assert (run / "backbone.safetensors").is_file()


def test_thread_count_precedence(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.getloadavg", lambda: (50.0, 0.0, 0.0))
    assert idle_cores() == 1 and choose_threads() == (1, "idle cores")
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert idle_cores() >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads() == (None, "OMP_NUM_THREADS")
    monkeypatch.setenv(ENV_VAR, "2")
    assert choose_threads() == (2, ENV_VAR)
    assert choose_threads(5) == (5, "--threads")
    monkeypatch.setenv(ENV_VAR, "zero")
    assert main(["--quiet", "synth", "--out", "unused"]) == 2  # a bad value is an expected error


def _record(obj, method, aupr, std=None, test_set=True):
    metrics = {"image_aupr": aupr, "image_auroc": aupr}
    if std is not None:
        metrics["image_aupr_std"] = std
    if test_set:
        metrics["test_set"] = {"normal": 16, "anomalous": 50, "pixels": 1000, "anomalous_pixels": 21}
    return ResultRecord(obj, method, "padim", metrics)


def test_tables_state_the_test_set_chance_levels_and_seed_spread():
    table = object_backbone_table([_record("pcb", "A", 0.9), _record("pcb", "B", 0.8)])
    text = table.to_markdown()
    assert "16 normal + 50 anomalous test images" in text and "1,000 pixels" in text
    assert "image AU-PR 75.8" in text and "pixel AU-PR 2.1" in text  # 50/66 and 21/1000
    assert "One seed per cell" in text
    seeded = metric_table(
        [
            _record("pcb", "A", 0.90, 0.01),
            _record("pcb", "B", 0.85, 0.01),
            _record("cap", "A", 0.80, 0.03),
            _record("cap", "B", 0.79, 0.02),
        ],
        "image_aupr",
    )
    note = seeded.notes[-1]
    assert "pcb: A leads B by 5.0, beyond their seed spread (2.0)" in note
    assert "cap: A leads B by 1.0, within their seed spread (5.0)" in note
    assert seeded.to_json()["notes"] == seeded.notes


def test_gallery_shows_best_detections_beside_worst_misses():
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.05])
    labels = np.array([1, 1, 1, 1, 0, 0])
    preds = Predictions("o", "m", scores, labels, images=np.zeros((6, 8, 8, 3)))
    items = preds.gallery_items(4)
    assert [(it.kind, it.score) for it in items] == [
        ("highest-scoring defect", 0.9),
        ("highest-scoring defect", 0.8),
        ("lowest-scoring defect", 0.1),
        ("highest-scoring normal", 0.3),
    ]
