"""Folders as users have them (issue 23): every fit calibrated, several folders per role, defect
types per subfolder, masks by stem/suffix (flat or mirroring the tree), symbolic links followed,
decisions at the model's thresholds; image modes scaled by bit depth / documented range."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from detect_fakes import square_images, tiny_padim_args
from PIL import Image

from spotdiff.cli import main
from spotdiff.data.io import load_image
from spotdiff.data.listing import list_images
from spotdiff.data.plain import folder_records, holdout, open_folders
from spotdiff.detect.evaluate import decision_metrics, decisions_text
from spotdiff.errors import DataError

SIZE = 32
MODEL = tiny_padim_args(SIZE)


def save_images(folder: Path, images, names) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, name in zip(images, names, strict=True):
        paths.append(folder / f"{name}.png")
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(paths[-1])
    return paths


def save_masks(folder: Path, images, names) -> None:
    """0/255 masks of the red squares of ``square_images(defect=True)``."""
    folder.mkdir(parents=True, exist_ok=True)
    for img, name in zip(images, names, strict=True):
        red = ((img[0] > 0.9) & (img[1] < 0.2)).numpy()
        Image.fromarray(red.astype(np.uint8) * 255).save(folder / f"{name}.png")


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory) -> Path:
    """An MVTec-AD category ``part``: 10 train/good, 4 test/good, test/crack and test/cut with 3
    images each under the same stems 000-002, masks in ground_truth/<type>/<stem>_mask.png."""
    root = tmp_path_factory.mktemp("mvtec")
    base = root / "part"
    save_images(base / "train" / "good", square_images(10, SIZE, seed=1), [f"{i:03d}" for i in range(10)])
    save_images(base / "test" / "good", square_images(4, SIZE, seed=2), [f"{i:03d}" for i in range(4)])
    for seed, kind in ((3, "crack"), (4, "cut")):
        bad = square_images(3, SIZE, defect=True, seed=seed)
        save_images(base / "test" / kind, bad, [f"{i:03d}" for i in range(3)])
        save_masks(base / "ground_truth" / kind, bad, [f"{i:03d}_mask" for i in range(3)])
    return root


@pytest.fixture(scope="module")
def model_dir(mvtec, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m"
    assert main(["--quiet", "fit", *MODEL, "--data", str(mvtec), "--object", "part", "--out", str(out)]) == 0
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- every fit is calibrated


def test_fit_data_holds_out_a_seeded_share_and_calibrates(mvtec, model_dir, tmp_path, capsys):
    config = json.loads((model_dir / "config.json").read_text())
    cal = config["calibration"]
    assert cal["source"] == {
        "validation": "held out of training split",
        "val_fraction": 0.2,
        "val_seed": 0,
        "n_val_good": 2,
    }
    assert config["n_train"] == 8 and len(cal["normal_scores"]) == 2
    assert np.isfinite(cal["image_threshold"]) and np.isfinite(cal["pixel_threshold"])
    # the same seed holds out the same images; the summary says how coarse 2 images measure the FPR
    again = tmp_path / "again"
    assert main(["fit", *MODEL, "--data", str(mvtec), "--object", "part", "--out", str(again)]) == 0
    out = capsys.readouterr().out
    assert json.loads((again / "config.json").read_text())["calibration"]["normal_scores"] == cal["normal_scores"]
    note = [line for line in out.splitlines() if "note:" in line]
    assert len(note) == 1 and "2 normal validation images" in note[0] and "steps of 0.5" in note[0]
    assert "--val-good" in note[0]


def test_no_calibration_keeps_the_old_fit_and_refuses_validation_options(mvtec, tmp_path, capsys):
    out = tmp_path / "plain"
    assert (
        main(
            ["--quiet", "fit", *MODEL, "--data", str(mvtec), "--object", "part", "--no-calibration", "--out", str(out)]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert "calibration" not in config and config["n_train"] == 10
    assert "no calibration" in capsys.readouterr().out
    assert (
        main(
            [
                "fit",
                *MODEL,
                "--data",
                str(mvtec),
                "--object",
                "part",
                "--no-calibration",
                "--val-good",
                str(mvtec / "part" / "test" / "good"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "--no-calibration" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_holdout_keeps_byte_identical_copies_on_one_side():
    paths = [Path(f"{i}.png") for i in range(10)]
    hashes = {p: f"h{i % 5}" for i, p in enumerate(paths)}  # 0 and 5, 1 and 6, ... are copies
    fit, val = holdout(paths, 0.2, seed=1, hashes=hashes)
    assert {hashes[paths[i]] for i in fit}.isdisjoint({hashes[paths[i]] for i in val})
    assert len(val) >= 2 and len(fit) + len(val) == 10
    _, plain_val = holdout(paths, 0.2, seed=1)
    assert len(plain_val) == 2 and plain_val == sorted(np.random.default_rng(1).permutation(10)[:2].tolist())


# ----------------------------------------------------------------------------- test routes: same answers


def _routes(mvtec: Path, tmp: Path) -> dict[str, list[str]]:
    part = mvtec / "part"
    good, crack, cut = (str(part / "test" / k) for k in ("good", "crack", "cut"))
    gt = part / "ground_truth"
    links = tmp / "links"  # a folder of symbolic links to the defect folders (and a mask tree beside it)
    links.mkdir()
    for kind in ("crack", "cut"):
        (links / kind).symlink_to(part / "test" / kind, target_is_directory=True)
    plain = tmp / "plain_masks"  # masks named by the plain stem, mirroring the types: equal stems are fine
    for kind in ("crack", "cut"):
        (plain / kind).mkdir(parents=True)
        for m in (gt / kind).iterdir():
            shutil.copy(m, plain / kind / m.name.replace("_mask", ""))
    return {
        "dataset": ["--data", str(mvtec), "--object", "part"],
        "folders": ["--good", good, "--bad", crack, cut, "--masks", str(gt / "crack"), str(gt / "cut")],
        "repeated_flags": [
            "--good",
            good,
            "--bad",
            crack,
            "--bad",
            cut,
            "--masks",
            str(gt / "crack"),
            "--masks",
            str(gt / "cut"),
        ],
        "symlinked_types": ["--good", good, "--bad", str(links), "--masks", str(gt)],
        "plain_stem_mirror": ["--good", good, "--bad", str(links), "--masks", str(plain), "--mask-suffix", ""],
    }


def test_every_route_reads_the_same_test_set(mvtec, model_dir, tmp_path, capsys):
    results = {}
    for name, args in _routes(mvtec, tmp_path).items():
        out = tmp_path / f"r_{name}"
        assert main(["test", str(model_dir), *args, "--out", str(out)]) == 0, name
        printed = capsys.readouterr()
        metrics = json.loads((out / "metrics.json").read_text())
        rows = read_csv(out / "scores.csv")
        results[name] = (metrics, {(r["defect_type"], Path(r["path"]).name): (r["score"], r["decision"]) for r in rows})
        assert set(metrics["per_defect_type"]) == {"crack", "cut"}, name
        assert metrics["test_set"]["per_defect_type"] == {"crack": 3, "cut": 3}, name
        assert "pixel_auroc" in metrics and metrics["test_set"]["anomalous_pixels"] > 0, name
        assert "false alarms" in printed.out and "crack: " in printed.out and "pixel FPR" in printed.out, name
        if name != "dataset":
            suffix = "<stem>.*" if name == "plain_stem_mirror" else "<stem>_mask.*"
            assert f"masks matched as {suffix} for 6 of 6 bad image(s)" in printed.err, name
    reference_metrics, reference_rows = results.pop("dataset")
    for name, (metrics, rows) in results.items():
        assert rows == reference_rows, name
        assert metrics["image_auroc"] == reference_metrics["image_auroc"], name
        assert metrics["pixel_auroc"] == pytest.approx(reference_metrics["pixel_auroc"]), name
        assert metrics["decisions"] == reference_metrics["decisions"], name


def test_test_reports_decisions_at_the_model_thresholds(mvtec, model_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["test", str(model_dir), "--data", str(mvtec), "--object", "part", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    cal = json.loads((model_dir / "config.json").read_text())["calibration"]
    decisions = metrics["decisions"]
    assert decisions["image_threshold"] == cal["image_threshold"]
    rows = read_csv(out / "scores.csv")
    for r in rows:
        assert r["decision"] == ("anomalous" if float(r["score"]) > cal["image_threshold"] else "normal")
    flagged = {(r["label"], r["decision"]) for r in rows}
    c = decisions["confusion"]
    assert c["false_positive"] == sum(r["label"] == "0" and r["decision"] == "anomalous" for r in rows)
    assert c["true_positive"] == sum(r["label"] == "1" and r["decision"] == "anomalous" for r in rows)
    assert c["true_negative"] + c["false_positive"] == 4 and c["true_positive"] + c["false_negative"] == 6
    assert decisions["recall"] == c["true_positive"] / 6 and flagged
    for kind in ("crack", "cut"):
        mine = [r for r in rows if r["defect_type"] == kind]
        assert decisions["per_defect_type"][kind]["detected"] == sum(r["decision"] == "anomalous" for r in mine)
    assert f"false alarms {c['false_positive']} of 4 good image(s)" in printed
    assert f"recall {c['true_positive']} of 6 bad image(s)" in printed


def test_decision_metrics_counts_exactly():
    records = [
        {"score": s, "label": y, "defect_type": t}
        for s, y, t in [
            (0.1, 0, "good"),
            (0.9, 0, "good"),
            (0.2, 0, "good"),
            (0.8, 1, "a"),
            (0.3, 1, "a"),
            (0.95, 1, "b"),
        ]
    ]
    maps = np.zeros((6, 2, 2), np.float32)
    masks = np.zeros((6, 2, 2), np.uint8)
    maps[1, 0, 0] = 1.0  # one defect pixel on a good image: 1 of 12 good pixels
    masks[3, :, 0] = 1  # two mask pixels, one found
    maps[3, 0, 0] = 1.0
    maps[5, 1, 1] = 1.0  # a defect pixel outside any mask on a bad image
    d = decision_metrics(records, maps, masks, image_threshold=0.5, pixel_threshold=0.5)
    assert d["confusion"] == {"true_positive": 2, "false_positive": 1, "true_negative": 2, "false_negative": 1}
    assert d["false_alarm_rate"] == pytest.approx(1 / 3) and d["recall"] == pytest.approx(2 / 3)
    assert d["precision"] == pytest.approx(2 / 3)
    assert d["per_defect_type"] == {
        "a": {"images": 2, "detected": 1, "recall": 0.5},
        "b": {"images": 1, "detected": 1, "recall": 1.0},
    }
    assert d["pixel"]["fpr"] == pytest.approx(2 / 22) and d["pixel"]["fpr_good_images"] == pytest.approx(1 / 12)
    assert d["pixel"]["recall"] == 0.5
    assert [r["decision"] for r in records] == ["normal", "anomalous", "normal", "anomalous", "normal", "anomalous"]
    nothing = decision_metrics(records, maps, np.zeros_like(masks), image_threshold=5.0, pixel_threshold=5.0)
    assert nothing["precision"] is None and nothing["pixel"]["recall"] is None
    assert "precision n/a" in decisions_text(nothing)


# ----------------------------------------------------------------------------- folders in the library


def test_defect_types_flat_and_nested(tmp_path):
    imgs = square_images(4, SIZE, defect=True, seed=5)
    save_images(tmp_path / "bad" / "scratch", imgs[:2], ["a", "b"])
    save_images(tmp_path / "bad", imgs[2:3], ["loose"])
    save_images(tmp_path / "dent", imgs[3:], ["c"])
    found = folder_records(None, [tmp_path / "bad", tmp_path / "dent"])
    assert sorted((r.image.name, r.defect_type) for r in found.records) == [
        ("a.png", "scratch"),
        ("b.png", "scratch"),
        ("c.png", "dent"),
        ("loose.png", "bad"),
    ]


def test_mask_threshold_binarises_non_binary_masks(tmp_path):
    imgs = square_images(1, SIZE, defect=True, seed=6)
    save_images(tmp_path / "bad", imgs, ["x"])
    soft = np.zeros((SIZE, SIZE), np.uint8)
    soft[2:6, 2:6] = 200
    soft[10:12, 10:12] = 40  # an anti-aliased / JPEG-like faint edge
    (tmp_path / "masks").mkdir()
    Image.fromarray(soft).save(tmp_path / "masks" / "x.png")
    with pytest.raises(DataError, match=r"x\.png: mask is not binary \(3 values: 0, 40, 200\)"):
        folder_records(None, tmp_path / "bad", tmp_path / "masks")
    dataset, _ = open_folders(None, tmp_path / "bad", tmp_path / "masks", image_size=None, mask_threshold=100)
    np.testing.assert_array_equal(dataset[0]["mask"].numpy(), (soft > 100).astype(np.float32))


def test_symlinked_folders_are_followed(tmp_path):
    imgs = square_images(3, SIZE, seed=7)
    save_images(tmp_path / "real" / "deep", imgs, ["a", "b", "c"])
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    found = folder_records(tmp_path / "good")
    assert [r.image.name for r in found.records] == ["a.png", "b.png", "c.png"]


# ----------------------------------------------------------------------------- image modes


def _gray16(value_max: int) -> np.ndarray:
    arr = np.zeros((8, 8), np.uint16)
    arr[:4] = 189
    arr[0, 0] = value_max
    return arr


@pytest.mark.parametrize("case", ["png16", "png16_other_max", "tiff16", "tiff32", "float_tiff"])
def test_image_modes_are_scaled_by_bit_depth_or_documented_range(case, tmp_path):
    path = tmp_path / ("x.png" if case.startswith("png") else "x.tif")
    if case == "png16":
        Image.fromarray(_gray16(189)).save(path)
        expected = round(189 / 65535 * 255)  # the bit depth sets the scale, not the content (1, not 255)
    elif case == "png16_other_max":
        Image.fromarray(_gray16(256)).save(path)  # one pixel higher must not change the others
        expected = round(189 / 65535 * 255)
    elif case == "tiff16":
        Image.fromarray(_gray16(189)).save(path)
        expected = round(189 / 65535 * 255)
    elif case == "tiff32":
        arr = np.zeros((8, 8), np.int32)
        arr[:4] = 2**30
        Image.fromarray(arr).save(path)
        expected = round(2**30 / (2**32 - 1) * 255)  # 32 bits per sample (the file's BitsPerSample)
    else:
        arr = np.zeros((8, 8), np.float32)
        arr[:4] = 0.5
        Image.fromarray(arr).save(path)
        expected = 128
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (8, 8, 3) and pixels[1, 1, 0] == expected, (case, pixels[1, 1])


@pytest.mark.parametrize(
    "values, message", [((0.0, 2.0), r"must be in \[0, 1\].*found \[0, 2\]"), ((np.nan, 0.5), "NaN or infinite")]
)
def test_float_images_outside_their_range_are_refused(values, message, tmp_path):
    arr = np.full((8, 8), values[1], np.float32)
    arr[0, 0] = values[0]
    Image.fromarray(arr).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=message):
        load_image(tmp_path / "f.tif")


def test_dangling_symlink_is_reported_like_an_unreadable_file(tmp_path):
    save_images(tmp_path / "good", square_images(2, SIZE, seed=8), ["a", "b"])
    os.symlink(tmp_path / "gone.png", tmp_path / "good" / "c.png")
    assert [p.name for p in list_images(tmp_path / "good")] == ["a.png", "b.png", "c.png"]  # listed, not skipped
    for read in (load_image, folder_records):  # and refused when read, like any unreadable file
        with pytest.raises(DataError, match=r"c\.png: broken symbolic link"):
            read(tmp_path / "good" / ("c.png" if read is load_image else ""))


# ----------------------------------------------------------------------------- fail closed, docs


def test_test_refuses_a_non_finite_score_instead_of_a_metric(mvtec, model_dir):
    import torch

    from spotdiff.data import open_dataset
    from spotdiff.detect import Detector
    from spotdiff.detect.evaluate import evaluate_detector

    model = Detector.load(model_dir)
    real = model.predict

    def broken(images):
        scores, maps = real(images)
        scores = scores.clone()
        scores[-1] = torch.nan
        return scores, maps

    model.predict = broken
    test = open_dataset(mvtec, "part", subset="test", image_size=SIZE)
    with pytest.raises(DataError, match=r"part/test/.*\.png: the model gives a non-finite score"):
        evaluate_detector(model, test)


def test_every_fit_and_test_command_of_deploy_md_parses():
    import re
    import shlex

    from spotdiff.cli import build_parser

    text = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text(encoding="utf-8")
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.DOTALL)).replace("\\\n", " ")
    commands = [shlex.split(m.group(1).split("#")[0]) for m in re.finditer(r"^spotdiff (.*)$", blocks, re.MULTILINE)]
    parser = build_parser()
    parsed = [parser.parse_args(argv) for argv in commands]  # SystemExit(2) on a bad command
    multi = [a for a in parsed if a.command == "test" and a.bad is not None and len(a.bad) > 1]
    assert {a.command for a in parsed} >= {"fit", "test", "export", "predict"} and multi


def test_list_images_allow_empty_still_refuses_a_loop(tmp_path):
    (tmp_path / "empty").mkdir()
    assert list_images(tmp_path / "empty", recursive=True, allow_empty=True) == []
    save_images(tmp_path / "a", square_images(1, SIZE, seed=9), ["x"])
    (tmp_path / "a" / "back").symlink_to(tmp_path / "a", target_is_directory=True)
    with pytest.raises(DataError, match="back: symbolic link loop"):
        list_images(tmp_path / "a", recursive=True, allow_empty=True)


def test_predict_refuses_a_folder_with_a_link_loop_instead_of_dropping_it(tmp_path):
    from spotdiff.detect.predict import collect_images

    save_images(tmp_path / "a", square_images(1, SIZE, seed=9), ["x"])
    save_images(tmp_path / "b", square_images(1, SIZE, seed=8), ["y"])
    (tmp_path / "a" / "back").symlink_to(tmp_path / "a", target_is_directory=True)
    with pytest.raises(DataError, match="back: symbolic link loop"):
        collect_images([tmp_path / "a", tmp_path / "b"])  # not: b's image alone, a silently dropped
    (tmp_path / "empty").mkdir()
    assert [p.name for p in collect_images([tmp_path / "empty", tmp_path / "b"])] == ["y.png"]
