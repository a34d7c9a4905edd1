"""Tests of the synthetic VisA-format dataset (spotdiff.data.synth) and ``spotdiff synth``."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spotdiff.cli import main
from spotdiff.data.io import load_image, load_mask
from spotdiff.data.synth import MARKER, OBJECTS, SPLITS, generate, image_counts, render_sample, split_assignment
from spotdiff.errors import ConfigError, DataError

SCALE = 0.06
SEED = 3
CSV_HEADER = "object,split,label,image,mask"


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "data", seed=SEED, scale=SCALE)


def _rows(root: Path, split: str) -> list[dict[str, str]]:
    with open(root / "split_csv" / f"{split}.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _marker(root: Path) -> dict:
    return json.loads((root / MARKER).read_text())


def test_layout_and_csv_columns(synth_root: Path) -> None:
    n_normal, n_anomalous = image_counts(SCALE)
    for name in OBJECTS:
        images = synth_root / name / "Data" / "Images"
        assert sorted(p.name for p in (images / "Normal").iterdir()) == [f"{i:04d}.JPG" for i in range(n_normal)]
        assert sorted(p.name for p in (images / "Anomaly").iterdir()) == [f"{i:03d}.JPG" for i in range(n_anomalous)]
        masks = synth_root / name / "Data" / "Masks" / "Anomaly"
        assert sorted(p.name for p in masks.iterdir()) == [f"{i:03d}.png" for i in range(n_anomalous)]
        with open(synth_root / name / "image_anno.csv", newline="") as fh:
            anno = list(csv.DictReader(fh))
        assert list(anno[0]) == ["image", "label", "mask"]
        assert len(anno) == n_normal + n_anomalous
    for split in SPLITS:
        text = (synth_root / "split_csv" / f"{split}.csv").read_text()
        assert text.splitlines()[0] == CSV_HEADER
        rows = _rows(synth_root, split)
        assert len(rows) == len(OBJECTS) * (n_normal + n_anomalous)
        for row in rows:
            assert row["object"] in OBJECTS and row["split"] in ("train", "test")
            assert (synth_root / row["image"]).is_file()
            if row["label"] == "normal":
                assert re.fullmatch(rf"{row['object']}/Data/Images/Normal/\d{{4}}\.JPG", row["image"])
                assert row["mask"] == ""
            else:
                assert row["label"] == "anomaly"
                assert re.fullmatch(rf"{row['object']}/Data/Images/Anomaly/\d{{3}}\.JPG", row["image"])
                assert row["mask"] == row["image"].replace("Images", "Masks").replace(".JPG", ".png")
                assert (synth_root / row["mask"]).is_file()


def test_format_matches_official_visa(synth_root: Path, visa_split_dir: Path, visa_id2class: Path) -> None:
    for split in SPLITS:
        official = (visa_split_dir / f"{split}.csv").read_text().splitlines()[0]
        assert (synth_root / "split_csv" / f"{split}.csv").read_text().splitlines()[0] == official
    official_text = visa_id2class.read_text()
    official = json.loads(official_text)
    assert json.dumps(official, indent=1) == official_text  # the formatting we imitate
    ours_text = (synth_root / "id2class.json").read_text()
    ours = json.loads(ours_text)
    assert json.dumps(ours, indent=1) == ours_text
    assert list(ours) == list(OBJECTS)
    for name, classes in ours.items():
        first = next(iter(official.values()))
        assert type(classes) is type(first) and classes["0"] == first["0"] == "BACKGROUND"
        assert list(classes) == [str(i) for i in range(len(classes))]
        assert [classes[str(i + 1)] for i in range(len(OBJECTS[name].defect_names))] == list(OBJECTS[name].defect_names)


def test_split_proportions(synth_root: Path) -> None:
    n_normal, n_anomalous = image_counts(SCALE)
    expected_train = {
        "1cls": (round(0.9 * n_normal), 0),
        "2cls_highshot": (round(0.6 * n_normal), round(0.6 * n_anomalous)),
        "2cls_fewshot": (round(0.2 * n_normal), round(0.2 * n_anomalous)),
    }
    for split in SPLITS:
        rows = _rows(synth_root, split)
        for name in OBJECTS:
            mine = [r for r in rows if r["object"] == name]
            assert len({r["image"] for r in mine}) == len(mine)  # every image exactly once
            count = {
                (s, lab): sum(r["split"] == s and r["label"] == lab for r in mine)
                for s in ("train", "test")
                for lab in ("normal", "anomaly")
            }
            assert (count["train", "normal"], count["train", "anomaly"]) == expected_train[split]
            assert count["train", "normal"] + count["test", "normal"] == n_normal
            assert count["train", "anomaly"] + count["test", "anomaly"] == n_anomalous
            # official row order: train normal, train anomaly, test normal, test anomaly
            order = [(r["split"], r["label"]) for r in mine]
            rank = {("train", "normal"): 0, ("train", "anomaly"): 1, ("test", "normal"): 2, ("test", "anomaly"): 3}
            assert [rank[o] for o in order] == sorted(rank[o] for o in order)
    # the two 2cls splits draw different random subsets
    assert _rows(synth_root, "2cls_fewshot") != _rows(synth_root, "2cls_highshot")


@pytest.mark.parametrize(("scale", "shots"), [(1.0, 10), (0.25, 5)])
def test_fewshot_pool_is_large_enough(scale: float, shots: int) -> None:
    n_normal, n_anomalous = image_counts(scale)
    for name in OBJECTS:
        assert split_assignment(0, name, "2cls_fewshot", "anomaly", n_anomalous).sum() >= shots
        assert split_assignment(0, name, "2cls_fewshot", "normal", n_normal).sum() >= shots


def test_masks_cover_defects_with_object_class_ids(synth_root: Path) -> None:
    areas = []
    for name, obj in OBJECTS.items():
        with open(synth_root / name / "image_anno.csv", newline="") as fh:
            anno = list(csv.DictReader(fh))
        seen: set[int] = set()
        for row in anno:
            if row["label"] == "normal":
                continue
            with Image.open(synth_root / row["mask"]) as im:
                assert im.mode == "L" and im.format == "PNG"
            mask = load_mask(synth_root / row["mask"])
            ids = set(np.unique(mask).tolist()) - {0}
            assert ids, row["mask"]
            assert ids <= set(range(1, len(obj.defect_names) + 1))
            assert row["label"].split(",") == [obj.defect_names[i - 1] for i in sorted(ids)]
            image = load_image(synth_root / row["image"])
            assert image.size == mask.shape[::-1] == (256, 256)
            areas.append(np.count_nonzero(mask) / mask.size)
            seen |= ids
        # defect types cycle, so a small dataset already shows each type
        assert seen == set(range(1, len(obj.defect_names) + 1))
    # visible but local: a small fraction of the image (some tiny, e.g. a missing pin)
    assert 0.001 < float(np.median(areas)) < 0.05
    assert max(areas) < 0.2


@pytest.mark.parametrize("name", list(OBJECTS))
def test_defects_change_exactly_the_masked_pixels(name: str) -> None:
    """Same sample rendered with and without its defects: they differ exactly on the mask."""
    obj = OBJECTS[name]
    for index in range(len(obj.defect_names) + 2):
        defective = render_sample(obj, SEED, index, anomalous=True, size=128)
        clean = render_sample(obj, SEED, index, anomalous=True, size=128, with_defects=False)
        changed = np.any(defective.image != clean.image, axis=2)
        masked = defective.mask > 0
        assert np.array_equal(changed, masked), f"{name} #{index}: changed pixels differ from the mask"
        assert clean.mask.max() == 0 and clean.defect_ids == ()


def test_normal_images_vary(synth_root: Path) -> None:
    for name in OBJECTS:
        paths = sorted((synth_root / name / "Data" / "Images" / "Normal").iterdir())[:6]
        images = [np.asarray(load_image(p), dtype=np.float32) for p in paths]
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                assert np.abs(images[i] - images[j]).mean() > 2.0, (paths[i], paths[j])


def test_deterministic_per_seed(synth_root: Path, tmp_path: Path) -> None:
    files = _marker(synth_root)["files"]
    # objects are generated independently, so one object regenerated alone must match byte for byte
    again = _marker(generate(tmp_path / "same", seed=SEED, scale=SCALE, objects=["cashew_synth"]))["files"]
    cashew = {k: v for k, v in files.items() if k.startswith("cashew_synth/")}
    assert cashew and {k: v for k, v in again.items() if k.startswith("cashew_synth/")} == cashew
    for rel, digest in again.items():  # the marker's hashes are those of the files on disk
        import hashlib

        assert hashlib.sha256((tmp_path / "same" / rel).read_bytes()).hexdigest() == digest
    # sample i does not depend on scale, so a smaller run with another seed covers the first images
    other = _marker(generate(tmp_path / "other", seed=SEED + 1, scale=0.05, objects=["cashew_synth"]))["files"]
    images = [k for k in other if k.endswith(".JPG")]
    assert images and all(other[k] != cashew[k] for k in images)


def test_rerun_is_noop_and_foreign_dirs_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "d"
    generate(out, seed=1, scale=0.05, image_size=64, objects=["capsules_synth"])
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    generate(out, seed=1, scale=0.05, image_size=64, objects=["capsules_synth"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == first
    # other parameters on a previous synth output: replaced, old files gone
    generate(out, seed=2, scale=0.05, image_size=64, objects=["cashew_synth"])
    assert _marker(out)["seed"] == 2 and not (out / "capsules_synth").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no staging directories left behind
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="foreign"):
        generate(foreign, scale=0.05, objects=["cashew_synth"])
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    for bad_marker in ("[1]", "{not json", '{"generator": "someone else"}'):
        (foreign / MARKER).write_text(bad_marker)
        with pytest.raises(DataError, match=MARKER):
            generate(foreign, scale=0.05, objects="cashew_synth")
    assert sorted(p.name for p in foreign.iterdir()) == sorted([MARKER, "notes.txt"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate(empty, scale=0.05, image_size=64, objects=["cashew_synth"]) / MARKER).is_file()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale": 0.0},
        {"scale": float("nan")},
        {"seed": -1},
        {"objects": ["bottle"]},
        {"objects": []},
        {"image_size": 8},
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        generate(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli_writes_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert (
        main(
            [
                "--quiet",
                "synth",
                "--out",
                str(out),
                "--seed",
                "4",
                "--scale",
                "0.05",
                "--objects",
                "pcb_synth",
                "--image-size",
                "64",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    assert _marker(out)["seed"] == 4 and _marker(out)["image_size"] == 64
    assert load_image(next((out / "pcb_synth" / "Data" / "Images" / "Anomaly").iterdir())).size == (64, 64)
    assert main(["--quiet", "synth", "--out", str(out), "--scale", "-1"]) == 2
    assert "scale" in capsys.readouterr().err


def test_data_layer_reads_synth_output(synth_root: Path) -> None:
    from spotdiff.data import open_dataset, sample_kshot

    for name, obj in OBJECTS.items():
        test = open_dataset(synth_root, name, split="1cls", subset="test", image_size=64)
        n_normal, n_anomalous = image_counts(SCALE)
        assert sum(test.labels) == n_anomalous and len(test) == n_anomalous + n_normal - round(0.9 * n_normal)
        assert test.class_names[1] == obj.defect_names[0]
        item = test[test.labels.index(1)]
        assert item["image"].shape == (3, 64, 64) and item["mask"].max() == 1
        assert set(item["class_mask"].unique().tolist()) - {0} <= set(range(1, len(obj.defect_names) + 1))
        assert item["defect_type"] != "good"
        few = open_dataset(synth_root, name, split="2cls_fewshot", subset="train", image_size=32)
        assert len(sample_kshot(few.labels, 2, seed=0)) == 4


def test_tiny_images_still_have_masks(tmp_path: Path) -> None:
    root = generate(tmp_path / "tiny", seed=5, scale=0.05, image_size=32)
    for row in _rows(root, "1cls"):
        if row["label"] == "anomaly":
            assert load_mask(root / row["mask"]).shape == (32, 32)
            assert load_mask(root / row["mask"]).any(), row["mask"]


@pytest.mark.slow  # a fresh interpreter imports torch (a few seconds)
def test_identical_bytes_in_another_process(tmp_path: Path) -> None:
    """No dependence on hash randomisation or on caches warmed by earlier calls."""
    import os
    import subprocess
    import sys

    kwargs = "seed=7, scale=0.05, image_size=64, objects=['pcb_synth']"
    here = _marker(generate(tmp_path / "here", seed=7, scale=0.05, image_size=64, objects=["pcb_synth"]))
    env = {
        **os.environ,
        "PYTHONHASHSEED": "123",
        "SPOTDIFF_QUIET": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    code = f"from spotdiff.data.synth import generate; generate({str(tmp_path / 'there')!r}, {kwargs})"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert _marker(tmp_path / "there")["files"] == here["files"]


def test_benchmark_frame_and_normal_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--normal N and --frame WxH: N normals at W x H (masks too), deterministic, recorded in the marker."""
    args = [
        "--quiet",
        "synth",
        "--out",
        str(tmp_path / "big"),
        "--seed",
        "2",
        "--scale",
        "0.05",
        "--objects",
        "cashew_synth",
        "--image-size",
        "48",
        "--normal",
        "7",
        "--frame",
        "96x64",
    ]
    assert main(args) == 0
    root = tmp_path / "big"
    normals = sorted((root / "cashew_synth" / "Data" / "Images" / "Normal").iterdir())
    assert len(normals) == 7 and all(load_image(p).size == (96, 64) for p in normals)
    anomalies = sorted((root / "cashew_synth" / "Data" / "Images" / "Anomaly").iterdir())
    masks = sorted((root / "cashew_synth" / "Data" / "Masks" / "Anomaly").iterdir())
    assert len(anomalies) == image_counts(0.05)[1] and all(load_mask(m).shape == (64, 96) for m in masks)
    assert all(load_mask(m).any() for m in masks)
    train = [r for r in _rows(root, "1cls") if r["split"] == "train"]
    assert len(train) == 6  # round(0.9 * 7)
    marker = _marker(root)
    assert marker["normal"] == 7 and marker["frame"] == [96, 64]
    # the same call elsewhere gives the same bytes; without the options the output differs
    again = generate(
        tmp_path / "again", seed=2, scale=0.05, image_size=48, objects=["cashew_synth"], normal=7, frame=(96, 64)
    )
    assert _marker(again)["files"] == marker["files"]
    plain = generate(tmp_path / "again", seed=2, scale=0.05, image_size=48, objects=["cashew_synth"])
    assert "normal" not in _marker(plain) and load_image(
        next((plain / "cashew_synth" / "Data" / "Images" / "Normal").iterdir())
    ).size == (48, 48)
    capsys.readouterr()
    assert main(args[:-1] + ["96by64"]) == 2
    assert "--frame must be WxH" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="normal must be"):
        generate(tmp_path / "x", normal=2)
