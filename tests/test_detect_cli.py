"""`spotdiff fit / test / predict` end to end, and predict's handling of awkward image files."""

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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    images = (0.45 + 0.04 * torch.randn(6, 3, 48, 48, generator=g)).clamp(0, 1)
    out = tmp_path_factory.mktemp("model") / "padim"
    PaDiM(arch="resnet18", d=20).fit([{"image": x} for x in images]).save(out)
    return out


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_handles_modes_sizes_and_corrupt_files(model_dir, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(100, 130, (48, 48, 3), dtype=np.uint8)).save(src / "rgb.png")
    Image.fromarray(rng.integers(100, 130, (70, 90), dtype=np.uint8), mode="L").save(src / "gray.png")
    Image.fromarray(rng.integers(0, 255, (30, 40, 4), dtype=np.uint8), mode="RGBA").save(src / "sub" / "rgba.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert (
        main(
            ["--quiet", "predict", str(model_dir), str(src), "--out", str(out), "--threshold", "5", "--batch-size", "2"]
        )
        == 1
    )  # completed, with an error row
    rows = {r["path"].split("/in/")[1]: r for r in read_csv(out / "scores.csv")}
    assert sorted(rows) == ["broken.png", "gray.png", "rgb.png", "sub/rgba.png"]
    assert "broken.png" in rows["broken.png"]["error"] and rows["broken.png"]["score"] == ""
    for name in ("gray.png", "rgb.png", "sub/rgba.png"):
        row = rows[name]
        assert row["error"] == "" and float(row["score"]) > 0 and row["anomalous"] in ("0", "1")
        with Image.open(row["overlay"]) as overlay:
            assert overlay.size[0] > 2 * 48 and overlay.size[1] > 48 and overlay.mode == "RGB"  # + bar and title


def test_predict_refuses_missing_input_and_bad_model(model_dir, tmp_path, capsys):
    assert main(["predict", str(model_dir), str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope: no such file" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "manifest missing" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_test_predict_on_synthetic_data(tmp_path):
    root = synth.generate(tmp_path / "synth", seed=0, scale=0.2, image_size=128, objects=["cashew_synth"])
    results = {}
    for model in ("padim", "patchcore"):
        mdir, rdir = tmp_path / f"m_{model}", tmp_path / f"r_{model}"
        assert (
            main(
                [
                    "--quiet",
                    "fit",
                    "--model",
                    model,
                    "--data",
                    str(root),
                    "--object",
                    "cashew_synth",
                    "--arch",
                    "resnet18",
                    "--image-size",
                    "128",
                    "--out",
                    str(mdir),
                ]
            )
            == 0
        )
        assert json.loads((mdir / "config.json").read_text())["model"] == model
        assert (
            main(
                [
                    "--quiet",
                    "test",
                    str(mdir),
                    "--data",
                    str(root),
                    "--object",
                    "cashew_synth",
                    "--out",
                    str(rdir),
                    "--save-maps",
                ]
            )
            == 0
        )
        metrics = json.loads((rdir / "metrics.json").read_text())
        rows = read_csv(rdir / "scores.csv")
        assert set(rows[0]) == {"path", "label", "defect_type", "score", "decision"}
        assert {r["decision"] for r in rows} <= {"anomalous", "normal"} and "decisions" in metrics  # fit calibrated
        assert {r["label"] for r in rows} == {"0", "1"}
        assert "per_defect_type" in metrics
        with np.load(rdir / "maps.npz") as npz:
            assert npz["maps"].shape == (len(rows), 128, 128) and npz["maps"].dtype == np.float16
        results[model] = metrics
        pred = tmp_path / f"p_{model}"
        anomalous = [r["path"] for r in rows if r["label"] == "1"][:3]
        assert main(["--quiet", "predict", str(mdir), *anomalous, "--out", str(pred)]) == 0
        assert len(read_csv(pred / "scores.csv")) == 3
    # random-init resnet18, 3 normal test images: pixel AU-ROC measured 0.95 (PaDiM), 0.92 (PatchCore);
    # image AU-ROC 0.70 / 0.71 rests on 3 normal images, so only "above chance" is asserted
    for metrics in results.values():
        assert metrics["image_auroc"] > 0.55 and metrics["pixel_auroc"] > 0.85


def test_fit_corrupt_training_image_fails_or_is_skipped(tmp_path, capsys):
    root = synth.generate(tmp_path / "synth", seed=0, scale=0.2, image_size=64, objects=["cashew_synth"])
    bad = sorted((root / "cashew_synth" / "Data" / "Images" / "Normal").iterdir())[0]
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    argv = [
        "--quiet",
        "fit",
        "--model",
        "padim",
        "--data",
        str(root),
        "--object",
        "cashew_synth",
        "--arch",
        "resnet18",
        "--d",
        "20",
        "--image-size",
        "64",
        "--out",
        str(tmp_path / "m"),
    ]
    assert main(argv) == 2
    assert bad.name in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main([*argv, "--skip-bad"]) == 0
    assert f"skipped {bad}" in capsys.readouterr().err
    assert (tmp_path / "m" / "manifest.json").is_file()


def test_fit_coreset_options(tmp_path, capsys):
    from spotdiff.data.synth import generate

    root = generate(tmp_path / "synth", seed=0, scale=0.05, image_size=48, objects=["cashew_synth"])
    common = [
        "--quiet",
        "fit",
        "--model",
        "patchcore",
        "--arch",
        "resnet18",
        "--data",
        str(root),
        "--object",
        "cashew_synth",
        "--image-size",
        "48",
    ]
    assert main([*common, "--coreset-ratio", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "coreset ratio must be in (0, 1]" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    for shard, recorded in (("0", None),):
        assert main([*common, "--coreset-shard", shard, "--io-threads", "2", "--out", str(tmp_path / shard)]) == 0
        assert json.loads((tmp_path / shard / "config.json").read_text())["coreset_shard"] == recorded


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
