"""Plain-folder fit/test, calibration (normalised score, thresholds) and calibrated predict."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from detect_fakes import square_images, tiny_padim_args
from PIL import Image

from spotdiff.cli import main
from spotdiff.detect import Detector, PaDiM, fit_folder
from spotdiff.detect.calibration import Calibration, f1_threshold, rates, tail_threshold
from spotdiff.errors import ConfigError, DataError

SIZE = 48


def write_images(folder, images, prefix="img"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            folder / f"{prefix}_{i}.png"
        )
    return folder


def write_masks(folder, images, prefix="img"):
    """Masks of the red squares drawn by ``square_images(defect=True)``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        red = ((img[0] > 0.9) & (img[1] < 0.2)).numpy()
        Image.fromarray(red.astype(np.uint8) * 255).save(folder / f"{prefix}_{i}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    write_images(root / "train", square_images(12, SIZE, seed=1))
    write_images(root / "val_good", square_images(6, SIZE, seed=2), "vg")
    bad = square_images(4, SIZE, defect=True, seed=3)
    write_images(root / "val_bad", bad, "vb")
    write_masks(root / "val_masks", bad, "vb")
    write_images(root / "test_good", square_images(4, SIZE, seed=4), "tg")
    test_bad = square_images(4, SIZE, defect=True, seed=5)
    write_images(root / "test_bad", test_bad, "tb")
    write_masks(root / "test_masks", test_bad[:3], "tb")  # tb_3 has no mask
    return root


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- threshold rules


def test_tail_threshold_flags_at_most_the_target_share():
    rng = np.random.default_rng(0)
    values = rng.normal(size=1000)
    for fpr in (0.0, 0.01, 0.05, 0.2):
        t = tail_threshold(values, fpr)
        assert (values > t).mean() <= fpr
        assert (values >= t).mean() > fpr  # the smallest such value of the set
    assert tail_threshold(values, 0.0) == values.max()
    assert (np.arange(100.0) > tail_threshold(np.arange(100.0), 0.29)).sum() == 29  # 0.29 * 100 < 29 in floats


def test_f1_threshold_is_the_best_over_all_cuts():
    rng = np.random.default_rng(1)
    scores = np.r_[rng.normal(0, 1, 50), rng.normal(1.5, 1, 30)]
    labels = np.r_[np.zeros(50), np.ones(30)]
    best = rates(scores, labels, f1_threshold(scores, labels))["f1"]
    brute = max(rates(scores, labels, t)["f1"] for t in np.r_[scores, scores.min() - 1])
    assert best == pytest.approx(brute)
    separable = f1_threshold(np.array([1.0, 2.0, 5.0, 6.0]), np.array([0, 0, 1, 1]))
    assert 2.0 < separable < 5.0


def test_normal_percentile_is_fraction_of_normal_scores_below():
    cal = Calibration(
        normal_scores=[1.0, 2.0, 3.0, 4.0],
        image_threshold=3.5,
        pixel_threshold=1.0,
        image_mode="normal-fpr",
        pixel_mode="normal-fpr",
    )
    assert cal.percentile([0.5, 2.0, 2.5, 10.0]).tolist() == [0.0, 0.25, 0.5, 1.0]
    assert Calibration.from_dict(cal.to_dict()) == cal


# ----------------------------------------------------------------------------- fit / test / predict on folders


def test_fit_folder_api_holds_out_validation_and_calibrates(folders):
    model, cal, unmasked = fit_folder(
        PaDiM(arch="resnet18", d=16, layers=["layer1", "layer2"]), folders / "train", image_size=SIZE, val_seed=3
    )
    assert model.n_train_ + cal.figures["n_val_good"] == 12 and cal.figures["n_val_good"] == 2
    assert cal.source == {
        "validation": "held out of training folder",
        "val_fraction": 0.2,
        "val_seed": 3,
        "n_val_good": 2,
    }
    assert cal.image_threshold == max(cal.normal_scores)  # 1 % of 2 images: none may be flagged
    assert cal.figures["image_fpr"] == 0.0 and unmasked == []
    paths = sorted((folders / "train").glob("*.png"))
    model2, cal2, _ = fit_folder(
        PaDiM(arch="resnet18", d=16, layers=["layer1", "layer2"]), paths, image_size=SIZE, val_seed=3
    )
    assert cal2.normal_scores == pytest.approx(cal.normal_scores)  # a path list = the folder


def test_cli_fit_test_predict_on_plain_folders(folders, tmp_path, capsys):
    mdir = tmp_path / "model"
    assert (
        main(
            [
                "--quiet",
                "fit",
                "--model",
                "padim",
                "--arch",
                "resnet18",
                "--weights",
                "random",
                "--d",
                "16",
                "--layers",
                "layer1",
                "layer2",
                "--image-size",
                str(SIZE),
                "--train",
                str(folders / "train"),
                "--val-good",
                str(folders / "val_good"),
                "--val-bad",
                str(folders / "val_bad"),
                "--val-masks",
                str(folders / "val_masks"),
                "--threshold-mode",
                "f1",
                "--out",
                str(mdir),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "image threshold" in out and "(f1)" in out and "pixel threshold" in out
    cal = json.loads((mdir / "config.json").read_text())["calibration"]
    assert cal["image_mode"] == "f1" and cal["pixel_mode"] == "f1"
    assert cal["figures"]["n_val_good"] == 6 and cal["figures"]["n_val_bad"] == 4
    assert cal["figures"]["image_f1"] > 0.8  # red squares on grey noise are easy
    assert len(cal["normal_scores"]) == 6 and len(cal["pixel_quantiles"]) == 101

    rdir = tmp_path / "results"
    assert (
        main(
            [
                "--quiet",
                "test",
                str(mdir),
                "--good",
                str(folders / "test_good"),
                "--bad",
                str(folders / "test_bad"),
                "--masks",
                str(folders / "test_masks"),
                "--out",
                str(rdir),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "1 bad image(s) have no mask" in captured.err and "tb_3.png" in captured.err
    metrics = json.loads((rdir / "metrics.json").read_text())
    assert metrics["image_auroc"] > 0.8 and "pixel_auroc" in metrics

    pdir = tmp_path / "pred"
    assert (
        main(
            [
                "--quiet",
                "predict",
                str(mdir),
                str(folders / "test_good"),
                str(folders / "test_bad"),
                "--out",
                str(pdir),
                "--masks",
            ]
        )
        == 0
    )
    rows = read_csv(pdir / "scores.csv")
    assert len(rows) == 8
    model = Detector.load(mdir)
    for row in rows:
        score = float(row["score"])
        below = sum(s < score for s in cal["normal_scores"]) / len(cal["normal_scores"])
        assert float(row["normal_percentile"]) == pytest.approx(below)
        assert (float(row["normalized_score"]) > 0.5) == (score > cal["image_threshold"])
        assert row["decision"] == ("anomalous" if score > cal["image_threshold"] else "normal")
        assert float(row["threshold"]) == pytest.approx(cal["image_threshold"])
        with Image.open(row["mask"]) as m:
            mask = np.asarray(m)
        with Image.open(row["path"]) as img:
            pixels = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)[None] / 255.0
        _, maps = model.predict(pixels)  # images at the model's size: the mask is at that size too
        expected = maps[0].numpy() > cal["pixel_threshold"] if row["decision"] == "anomalous" else False
        np.testing.assert_array_equal(mask > 0, expected)  # outlines on anomalous images only
    bad_rows = [r for r in rows if "/tb_" in r["path"]]
    assert sum(r["decision"] == "anomalous" for r in bad_rows) >= 3
    with Image.open(bad_rows[0]["overlay"]) as ov:
        overlay = np.asarray(ov)
    assert (overlay == 255).all(axis=-1).any()  # the white mask contour is drawn


def test_old_model_without_calibration_still_predicts(tmp_path, folders):
    mdir = tmp_path / "old"
    PaDiM(arch="resnet18", d=8, layers=["layer1"]).fit([{"image": x} for x in square_images(4, 32)]).save(mdir)
    assert "calibration" not in json.loads((mdir / "config.json").read_text())
    out = tmp_path / "p"
    assert main(["--quiet", "predict", str(mdir), str(folders / "test_good"), "--out", str(out), "--no-overlays"]) == 0
    rows = read_csv(out / "scores.csv")
    assert {r["decision"] for r in rows} == {"no threshold"} and {r["normalized_score"] for r in rows} == {""}
    assert (
        main(
            [
                "--quiet",
                "predict",
                str(mdir),
                str(folders / "test_good"),
                "--out",
                str(out),
                "--no-overlays",
                "--threshold",
                "0",
            ]
        )
        == 0
    )
    assert {r["decision"] for r in read_csv(out / "scores.csv")} == {"anomalous"}
    assert main(["predict", str(mdir), str(folders / "test_good"), "--out", str(out), "--masks"]) == 2


# ----------------------------------------------------------------------------- bad input


def _fit(args, tmp_path):
    return main(
        [
            "fit",
            *tiny_padim_args(32),
            "--out",
            str(tmp_path / "m"),
            *args,
        ]
    )


@pytest.mark.parametrize(
    "case", ["empty", "no_images", "overlap", "f1_without_bad", "orphan_mask", "mask_size", "manual_without_value"]
)
def test_bad_folder_input_is_one_line_exit_2_nothing_written(case, folders, tmp_path, capsys):
    train = str(folders / "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "text"
    text.mkdir()
    (text / "notes.txt").write_text("no images")
    masks = tmp_path / "masks"
    write_masks(masks, square_images(2, SIZE, defect=True, seed=3), "vb")
    (masks / "stray.png").write_bytes((masks / "vb_0.png").read_bytes())
    small = tmp_path / "small"
    write_masks(small, square_images(1, 24, defect=True)[:, :, :16, :16], "vb")
    args, expected = {
        "empty": (["--train", str(empty)], f"no image files found in {empty}"),
        "no_images": (["--train", str(text)], f"no image files found in {text}"),
        "overlap": (["--train", train, "--val-good", train], "in both the training set and the normal validation set"),
        "f1_without_bad": (["--train", train, "--threshold-mode", "f1"], "needs anomalous validation images"),
        "orphan_mask": (
            ["--train", train, "--val-bad", str(folders / "val_bad"), "--val-masks", str(masks)],
            "stray.png: mask without a bad image",
        ),
        "mask_size": (
            ["--train", train, "--val-bad", str(folders / "val_bad"), "--val-masks", str(small)],
            "vb_0.png: mask is 16x16 but image",
        ),
        "manual_without_value": (["--train", train, "--threshold-mode", "manual"], "needs a value (--threshold T)"),
    }[case]
    assert _fit(args, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spotdiff fit: error:") and expected in err, err
    assert not (tmp_path / "m").exists()


def test_test_command_needs_both_folders(folders, tmp_path, capsys):
    mdir = tmp_path / "m"
    PaDiM(arch="resnet18", d=8, layers=["layer1"]).fit([{"image": x} for x in square_images(4, 32)]).save(mdir)
    assert main(["test", str(mdir), "--good", str(folders / "test_good"), "--out", str(tmp_path / "r")]) == 2
    assert "needs both --good DIR and --bad DIR" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_open_folders_errors(folders, tmp_path):
    from spotdiff.data.plain import open_folders, split_train_val

    with pytest.raises(DataError, match="masks given without bad images"):
        open_folders(folders / "test_good", None, folders / "test_masks")
    with pytest.raises(DataError, match="too few"):
        split_train_val(sorted((folders / "train").glob("*.png"))[:3])
    with pytest.raises(ConfigError, match="target false-positive rate"):
        fit_folder(PaDiM(arch="resnet18", d=8), folders / "train", target_fpr=1.5)


def test_dataset_fit_calibrates_with_val_good_and_refuses_overlap(folders, tmp_path, capsys):
    """--data/--object (an MVTec-style tree) plus --val-good: calibrated; --val-good inside train: refused."""
    train = write_images(tmp_path / "mv" / "obj" / "train" / "good", square_images(6, SIZE, seed=1))
    base = [
        "fit",
        *tiny_padim_args(SIZE),
        "--data",
        str(tmp_path / "mv"),
        "--object",
        "obj",
    ]
    assert main(["--quiet", *base, "--val-good", str(folders / "val_good"), "--out", str(tmp_path / "m")]) == 0
    cal = json.loads((tmp_path / "m" / "config.json").read_text())["calibration"]
    assert cal["source"] == {"validation": "given", "n_val_good": 6} and len(cal["normal_scores"]) == 6
    assert "image threshold" in capsys.readouterr().out
    assert main([*base, "--val-good", str(train), "--out", str(tmp_path / "m2")]) == 2
    assert "in both the training set and the normal validation set" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()


def test_mask_contour_is_the_outline_of_the_mask():
    from spotdiff.detect.predict import draw_mask_contour

    mask = np.zeros((10, 10), bool)
    mask[2:6, 3:8] = True
    out = draw_mask_contour(np.zeros((10, 10, 3), np.uint8), mask, (255, 0, 0))
    drawn = (out == (255, 0, 0)).all(axis=-1)
    inner = np.zeros_like(mask)
    inner[3:5, 4:7] = True
    np.testing.assert_array_equal(drawn, mask & ~inner)
