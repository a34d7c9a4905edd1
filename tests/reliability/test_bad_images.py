"""Bad and unusual images and masks across commands.

Unusual but valid files (a PNG named .JPG, CMYK, 16-bit, grayscale, RGBA, palette, EXIF-rotated)
are read as the same picture everywhere. Broken files (empty, truncated, text named .JPG, a mask
of the wrong size) stop every command with exit status 2 and a message naming the file and CSV
row, never a traceback; `open_dataset(skip_bad=True)` skips and reports them instead.
The full matrix runs the CLI in-process (``spotdiff.cli.main``, same code path and exit status);
one subprocess run checks the real interpreter exit and stderr.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import (
    BAD_IMAGES,
    BLOCK,
    GOOD_IMAGES,
    OBJECT,
    H,
    Row,
    W,
    anomaly_row,
    assert_clean_error,
    block_mask,
    noise_jpeg,
    normal_row,
    png_bytes,
    run_cli,
    write_csv,
    write_tree,
)

from spotdiff.cli import main
from spotdiff.data import ImageFolderDataset, open_dataset
from spotdiff.data.io import load_image, load_image_bytes
from spotdiff.errors import DataError


def json_load(path: Path) -> dict:
    return json.loads(path.read_text())


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _assert_block_picture(image: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """``image`` (3, H, W) is the W x H white-block picture, upright; ``mask`` marks the block."""
    assert tuple(image.shape) == (3, H, W)
    inside = image[:, BLOCK[0], BLOCK[1]]
    outside = image.clone()
    outside[:, BLOCK[0], BLOCK[1]] = 0
    assert inside.mean() > 0.85 and outside.sum() / (image.numel() - inside.numel()) < 0.1
    if mask is not None:
        assert torch.equal(mask, torch.from_numpy(block_mask()).float())


@pytest.fixture(scope="module")
def good_tree(tmp_path_factory) -> Path:
    """Every unusual-but-valid kind as an anomalous test image (with its mask) and a train image."""
    root = tmp_path_factory.mktemp("good")
    rows = []
    for kind, (suffix, make) in GOOD_IMAGES.items():
        rows.append(normal_row(kind, make(), suffix=suffix))
        rows.append(anomaly_row(kind, make(), suffix=suffix))
    return write_tree(root, rows)


def test_unusual_images_load_upright_as_rgb(good_tree):
    for kind, (suffix, _) in GOOD_IMAGES.items():
        path = good_tree / OBJECT / "Data" / "Images" / "Normal" / f"{kind}{suffix}"
        img = load_image(path)
        assert img.mode == "RGB" and img.size == (W, H), kind
        assert np.array_equal(np.asarray(load_image_bytes(path.read_bytes(), kind)), np.asarray(img)), kind  # upload
    train = open_dataset(good_tree, OBJECT, subset="train", image_size=None)
    test = open_dataset(good_tree, OBJECT, subset="test", image_size=None)
    assert len(train) == len(test) == len(GOOD_IMAGES)
    for i in range(len(train)):
        _assert_block_picture(train[i]["image"])
        item = test[i]
        _assert_block_picture(item["image"], item["mask"])
    folder = ImageFolderDataset(good_tree / OBJECT / "Data" / "Images" / "Normal", image_size=None)
    assert len(folder) == len(GOOD_IMAGES)
    for i in range(len(folder)):
        _assert_block_picture(folder[i]["image"])


def test_prepare_accepts_unusual_images_and_copies_them_verbatim(good_tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--quiet", "prepare", "--visa-root", str(good_tree), "--split", "1cls", "--out", str(out)]) == 0
    prepared = out / "1cls" / OBJECT
    for kind, (suffix, make) in GOOD_IMAGES.items():
        assert (prepared / "train" / "good" / f"{kind}{suffix}").read_bytes() == make()
        assert (prepared / "test" / "bad" / f"{kind}{suffix}").read_bytes() == make()
    test = open_dataset(out, OBJECT, split="1cls", subset="test", image_size=None)
    assert len(test) == len(GOOD_IMAGES)
    for i in range(len(test)):
        _assert_block_picture(test[i]["image"], test[i]["mask"])


def _bad_cases() -> dict[str, tuple[list, str]]:
    """Trees with exactly one broken file each: kind -> (rows, the broken file's relative path)."""
    cases = {}
    for kind, (suffix, make) in BAD_IMAGES.items():
        bad = anomaly_row(kind, make(), suffix=suffix)
        cases[f"image_{kind}"] = ([normal_row("ok", noise_jpeg(0)), bad], bad.image)
        bad_mask = anomaly_row(f"mask_{kind}", noise_jpeg(1, 32), mask=make())
        cases[f"mask_{kind}"] = ([normal_row("ok", noise_jpeg(0)), bad_mask], bad_mask.mask)
    wrong = anomaly_row("wrong_size", noise_jpeg(2, 32), mask=png_bytes(np.ones((31, 32), np.uint8)))
    cases["mask_wrong_size"] = ([normal_row("ok", noise_jpeg(0)), wrong], wrong.mask)
    return cases


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_broken_file_stops_prepare_and_dataset_naming_it(case, tmp_path, capsys):
    rows, broken = BAD_CASES[case]
    root = write_tree(tmp_path / "visa", rows)
    out = tmp_path / "out"
    assert main(["--quiet", "prepare", "--visa-root", str(root), "--split", "1cls", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(root / broken) in err and "1cls.csv row 3" in err, err
    assert not out.exists(), "prepare wrote output although validation failed"

    test = open_dataset(root, OBJECT, subset="test", image_size=32)
    with pytest.raises(DataError) as info:
        test[0]
    assert str(root / broken) in str(info.value)
    skipped = open_dataset(root, OBJECT, subset="test", image_size=32, skip_bad=True)
    assert len(skipped) == 0 and skipped.skipped[0][0] == str(root / rows[1].image)
    assert str(root / broken) in skipped.skipped[0][1]


def test_text_file_named_jpg_in_an_image_folder_is_named(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.JPG").write_bytes(noise_jpeg(0))
    (folder / "b.JPG").write_bytes(b"not an image")
    ds = ImageFolderDataset(folder, image_size=16)
    assert ds[0]["image"].shape == (3, 16, 16)
    with pytest.raises(DataError, match=str(folder / "b.JPG")):
        ds[1]


def test_cli_subprocess_lists_every_broken_file_without_traceback(tmp_path):
    rows, broken = [normal_row("ok", noise_jpeg(0))], []
    for case in ("image_zero_bytes", "image_truncated_jpeg", "mask_text_named_jpg", "mask_wrong_size"):
        case_rows, path = BAD_CASES[case]
        rows.append(case_rows[1])
        broken.append(path)
    root = write_tree(tmp_path / "visa", rows)
    out = tmp_path / "out"
    proc = run_cli("prepare", "--visa-root", root, "--split", "1cls", "--out", out)
    assert_clean_error(proc, *(root / b for b in broken), "4 of 5 row(s) failed validation")
    assert not out.exists()


# ------------------------------------------------------------------- fit / test / predict / pretrain
FIT = ["fit", "--model", "padim", "--object", OBJECT, "--arch", "resnet18", "--image-size", "32", "--d", "16"]
PRETRAIN = [
    "pretrain",
    "--method",
    "simsiam",
    "--arch",
    "resnet18",
    "--steps",
    "1",
    "--batch-size",
    "4",
    "--image-size",
    "32",
    "--workers",
    "0",
]


def test_unusual_images_fit_and_predict(good_tree, tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["--quiet", *FIT, "--data", str(good_tree), "--out", str(model)]) == 0
    config = json_load(model / "config.json")  # fitted on some, calibrated on the held-out rest
    assert config["n_train"] + config["calibration"]["figures"]["n_val_good"] == len(GOOD_IMAGES)
    normal = good_tree / OBJECT / "Data" / "Images" / "Normal"
    assert main(["--quiet", "predict", str(model), str(normal), "--out", str(tmp_path / "pred")]) == 0
    rows = csv_rows(tmp_path / "pred" / "scores.csv")
    assert len(rows) == len(GOOD_IMAGES) and not any(r["error"] for r in rows)
    assert all(np.isfinite(float(r["score"])) and Path(r["overlay"]).is_file() for r in rows)


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_broken_image_stops_fit_and_test_and_is_skipped_in_predict(kind, tmp_path, capsys):
    suffix, make = BAD_IMAGES[kind]
    rows = [normal_row(f"{i:03d}", noise_jpeg(i)) for i in range(4)]
    rows += [
        normal_row("broken", make(), suffix=suffix),
        normal_row("t0", noise_jpeg(10), split="test"),
        anomaly_row("a0", noise_jpeg(11), png_bytes(np.ones((32, 32), np.uint8))),
    ]
    root = write_tree(tmp_path / "visa", rows)
    broken = root / rows[4].image
    model = tmp_path / "model"
    assert main(["--quiet", *FIT, "--data", str(root), "--out", str(model)]) == 2
    assert str(broken) in capsys.readouterr().err and not model.exists()
    # --skip-bad: fitted and calibrated on the 4 readable images, the broken one reported by name.
    assert main([*FIT, "--data", str(root), "--out", str(model), "--skip-bad"]) == 0
    assert str(broken) in capsys.readouterr().err
    config = json_load(model / "config.json")
    assert config["n_train"] + config["calibration"]["figures"]["n_val_good"] == 4

    test_rows = [*rows[5:], Row("test", "normal", rows[4].image, b"")]  # the broken file as a test image
    csv_path = write_csv(tmp_path / "test.csv", [(OBJECT, r.split, r.label, r.image, r.mask) for r in test_rows])
    argv = ["test", str(model), "--data", str(root), "--object", OBJECT, "--split-csv", str(csv_path)]
    assert main(["--quiet", *argv, "--out", str(tmp_path / "test")]) == 2
    assert str(broken) in capsys.readouterr().err and not (tmp_path / "test").exists()

    good = root / rows[0].image
    assert main(["--quiet", "predict", str(model), str(good), str(broken), "--out", str(tmp_path / "pred")]) == 1
    assert str(broken) in capsys.readouterr().err
    by_path = {r["path"]: r for r in csv_rows(tmp_path / "pred" / "scores.csv")}
    assert by_path[str(good)]["error"] == "" and np.isfinite(float(by_path[str(good)]["score"]))
    assert str(broken) in by_path[str(broken)]["error"] and by_path[str(broken)]["score"] == ""


def test_mask_of_the_wrong_size_stops_test(tmp_path, capsys):
    rows = [normal_row(f"{i:03d}", noise_jpeg(i)) for i in range(3)]
    rows.append(anomaly_row("a0", noise_jpeg(11), png_bytes(np.ones((31, 32), np.uint8))))
    root = write_tree(tmp_path / "visa", rows)
    model = tmp_path / "model"
    assert main(["--quiet", *FIT, "--data", str(root), "--out", str(model), "--no-calibration"]) == 0  # 3 images
    argv = ["test", str(model), "--data", str(root), "--object", OBJECT, "--out", str(tmp_path / "test")]
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert str(root / rows[3].mask) in err and str(root / rows[3].image) in err


@pytest.mark.parametrize("kind", ["zero_bytes", "text_named_jpg"])
def test_broken_image_stops_pretrain_naming_it_unless_skipped(kind, tmp_path, capsys):
    suffix, make = BAD_IMAGES[kind]
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.JPG").write_bytes(noise_jpeg(i))
    broken = images / f"broken{suffix}"
    broken.write_bytes(make())
    run = tmp_path / "run"
    assert main(["--quiet", *PRETRAIN, "--data", str(images), "--out", str(run)]) == 2
    assert str(broken) in capsys.readouterr().err
    assert main(["--quiet", *PRETRAIN, "--data", str(images), "--out", str(tmp_path / "run2"), "--skip-bad"]) == 0
    assert str(broken) in capsys.readouterr().err  # the skipped files are listed even with --quiet
    assert (tmp_path / "run2" / "backbone.safetensors").is_file()
