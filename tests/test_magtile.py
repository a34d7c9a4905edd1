"""Magnetic-tile loader: seeded split, counts, binary aligned masks, errors; read ../shared in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spotdiff.data import open_dataset, open_magnetic_tile
from spotdiff.data.magtile import MASK_THRESHOLD, magnetic_tile_records, split_free_images
from spotdiff.errors import ConfigError, DataError
from spotdiff.metrics import evaluate

SHARED_REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
README_COUNTS = {"Blowhole": 115, "Break": 85, "Crack": 57, "Fray": 32, "Uneven": 103}
N_FREE = 952


@pytest.fixture(scope="module")
def mt_root() -> Path:
    root = SHARED_REALDATA / "magnetic_tile"
    if not (root / "MT_Free" / "Imgs").is_dir():
        pytest.skip(f"magnetic-tile dataset not found at {root}")
    return root


def _write_pair(
    folder: Path,
    name: str,
    size: tuple[int, int] = (40, 30),
    mask_size: tuple[int, int] | None = None,
    defect: bool = True,
) -> None:
    """A gray JPEG ``name.jpg`` (w, h = size) and its 0/255 mask ``name.png`` in ``folder/Imgs``."""
    imgs = folder / "Imgs"
    imgs.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], 120, np.uint8)).save(imgs / f"{name}.jpg")
    mask = np.zeros((mask_size or size)[::-1], np.uint8)
    if defect:
        mask[5:15, 10:20] = 255
    Image.fromarray(mask).save(imgs / f"{name}.png")


@pytest.fixture()
def fake_root(tmp_path: Path) -> Path:
    """A tiny magnetic-tile tree: 10 normal images, 2 Crack, 1 Uneven with an empty mask."""
    root = tmp_path / "mt"
    for i in range(10):
        _write_pair(root / "MT_Free", f"free_{i}", defect=False)
    _write_pair(root / "MT_Crack", "crack_0")
    _write_pair(root / "MT_Crack", "crack_1")
    _write_pair(root / "MT_Uneven", "uneven_0", defect=False)
    return root


# ----------------------------------------------------------------------------- split and counts (real data)


def test_counts_match_readme(mt_root):
    train = magnetic_tile_records(mt_root, "train")
    test = magnetic_tile_records(mt_root, "test")
    normal = [r for r in train + test if r.label == 0]
    assert len(normal) == N_FREE
    per_type = {t: sum(r.defect_type == t for r in test) for t in README_COUNTS}
    assert per_type == README_COUNTS
    assert all(r.label == 0 for r in train)
    assert len(test) == N_FREE - len(train) + sum(README_COUNTS.values())


def test_split_reproducible_disjoint_proportions(mt_root):
    train = open_magnetic_tile(mt_root, "train", seed=0)
    test = open_magnetic_tile(mt_root, "test", seed=0)
    assert train.paths == open_magnetic_tile(mt_root, "train", seed=0).paths
    assert test.paths == open_magnetic_tile(mt_root, "test", seed=0).paths
    assert train.paths != open_magnetic_tile(mt_root, "train", seed=1).paths
    test_normal = [p for p, y in zip(test.paths, test.labels) if y == 0]
    assert not set(train.paths) & set(test.paths)
    assert len(train) == round(0.8 * N_FREE) == 762 and len(test_normal) == N_FREE - 762
    all_free = {str(p) for p in (mt_root / "MT_Free" / "Imgs").glob("*.jpg")}
    assert set(train.paths) | set(test_normal) == all_free
    assert len(open_magnetic_tile(mt_root, "train", train_fraction=0.5)) == N_FREE // 2


def test_open_dataset_autodetects(mt_root):
    direct = open_magnetic_tile(mt_root, "test", image_size=64, seed=3)
    for root in (mt_root, mt_root.parent):
        ds = open_dataset(root, "magnetic_tile", subset="test", image_size=64, seed=3)
        assert ds.paths == direct.paths and ds.labels == direct.labels
    assert ds.class_names == {0: "BACKGROUND", 1: "Blowhole", 2: "Break", 3: "Crack", 4: "Fray", 5: "Uneven"}


def test_masks_binary_and_aligned(mt_root):
    test = open_magnetic_tile(mt_root, "test", image_size=(72, 56))
    ids = {name: i for i, name in test.class_names.items()}
    by_type: dict[str, list[int]] = {}
    for i, r in enumerate(test.records):
        by_type.setdefault(r.defect_type, []).append(i)
    for defect_type, indices in by_type.items():
        for i in indices[:3]:
            item = test[i]
            assert item["image"].shape == (3, 72, 56) and item["mask"].shape == (72, 56)
            assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
            assert item["defect_type"] == defect_type and item["label"] == int(defect_type != "good")
            present = set(item["class_mask"].unique().tolist())
            assert present == ({0} if defect_type == "good" else {0, ids[defect_type]})
    # native size: the mask is exactly the file thresholded at 128 (its edges are anti-aliased)
    native = open_magnetic_tile(mt_root, "test", image_size=None)
    i = by_type["Crack"][0]
    raw = np.asarray(Image.open(native.records[i].mask))
    item = native[i]
    assert item["image"].shape[1:] == raw.shape
    np.testing.assert_array_equal(item["mask"].numpy(), (raw >= MASK_THRESHOLD).astype(np.float32))


# ----------------------------------------------------------------------------- synthetic trees: rules and errors


def test_split_rule():
    train, test = split_free_images(10, seed=0, train_fraction=0.8)
    assert len(train) == 8 and sorted(train + test) == list(range(10))
    assert (train, test) == split_free_images(10, seed=0, train_fraction=0.8)
    with pytest.raises(ConfigError, match="train_fraction"):
        split_free_images(10, train_fraction=1.0)
    with pytest.raises(DataError, match="cannot be split"):
        split_free_images(2, train_fraction=0.5)


def test_empty_mask_anomaly_stays_anomalous(fake_root):
    test = open_dataset(fake_root, "magnetic_tile", subset="test", image_size=32)
    items = [test[i] for i in range(len(test))]
    uneven = [it for it in items if it["defect_type"] == "Uneven"]
    assert len(uneven) == 1 and uneven[0]["label"] == 1 and uneven[0]["mask"].sum() == 0
    crack = [it for it in items if it["defect_type"] == "Crack"]
    assert all(it["mask"].sum() > 0 for it in crack)
    labels = np.array([it["label"] for it in items])
    masks = np.stack([it["mask"].numpy() for it in items])
    maps = masks + 0.01 * np.arange(len(items))[:, None, None]
    result = evaluate(maps.max(axis=(1, 2)), labels, maps, masks)
    assert 0.0 <= result["image_auroc"] <= 1.0 and result["pixel_auroc"] == pytest.approx(1.0)


def test_missing_free_folder(tmp_path, fake_root):
    with pytest.raises(DataError, match="MT_Free"):
        open_magnetic_tile(tmp_path, "train")
    for p in (fake_root / "MT_Free" / "Imgs").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="no .jpg images"):
        open_magnetic_tile(fake_root, "train")


def test_image_without_mask(fake_root):
    (fake_root / "MT_Crack" / "Imgs" / "crack_1.png").unlink()
    open_magnetic_tile(fake_root, "train")  # the train subset does not read defect folders
    with pytest.raises(DataError, match="crack_1.jpg: image has no mask"):
        open_magnetic_tile(fake_root, "test")


def test_mask_size_mismatch(fake_root):
    _write_pair(fake_root / "MT_Crack", "crack_1", mask_size=(41, 30))
    test = open_magnetic_tile(fake_root, "test", image_size=32)
    bad = test.paths.index(str(fake_root / "MT_Crack" / "Imgs" / "crack_1.jpg"))
    with pytest.raises(DataError, match=r"crack_1\.png is 41x30 but image .*crack_1\.jpg is 40x30"):
        test[bad]
    sub = test.subset([bad])
    with pytest.raises(DataError, match="crack_1.png"):
        sub[0]
    assert len(open_magnetic_tile(fake_root, "test", image_size=32, skip_bad=True)) == len(test) - 1


# ----------------------------------------------------------------------------- real-data detection check


@pytest.mark.slow
def test_padim_detects_real_defects(mt_root):
    """PaDiM, random-init resnet18 (layer1+layer2, d=30), 128 px: 100 train normal, 25+25 test images.

    Measured (split/subset/backbone seed 0, 1, 2): image AU-ROC 0.730, 0.742, 0.619; pixel AU-ROC
    0.703, 0.679, 0.605. At 96 px with 60 training images it was near chance (0.43-0.69), so the
    size and count below are the smallest that work. 3 s on an idle core, ~30 s on the loaded machine.
    """
    from spotdiff.detect import PaDiM
    from spotdiff.detect.evaluate import evaluate_detector

    rng = np.random.default_rng(0)
    train = open_magnetic_tile(mt_root, "train", image_size=128)
    train = train.subset(sorted(rng.choice(len(train), 100, replace=False).tolist()))
    test = open_magnetic_tile(mt_root, "test", image_size=128)
    labels = np.array(test.labels)
    picked = [rng.choice(np.flatnonzero(labels == y), 25, replace=False) for y in (0, 1)]
    test = test.subset(sorted(np.concatenate(picked).tolist()))
    model = PaDiM(arch="resnet18", layers=["layer1", "layer2"], d=30, seed=0).fit(train)
    metrics, *_ = evaluate_detector(model, test)
    assert metrics["image_auroc"] > 0.62, metrics  # measured 0.730
    assert metrics["pixel_auroc"] > 0.6, metrics  # measured 0.703


def test_fit_records_the_split_seed_and_test_reuses_it(fake_root, tmp_path, capsys):
    import csv
    import json

    from spotdiff.cli import main

    model = tmp_path / "model"
    fit = [
        "--quiet",
        "fit",
        "--model",
        "padim",
        "--data",
        str(fake_root),
        "--object",
        "magnetic_tile",
        "--image-size",
        "32",
        "--d",
        "4",
        "--split-seed",
        "3",
        "--weights",
        "random",
        "--out",
        str(model),
        "--no-calibration",
    ]  # the fake tiles are byte-identical copies: nothing to hold out
    assert main(fit) == 0
    assert json.loads((model / "config.json").read_text())["data_source"]["split_seed"] == 3
    test = ["--quiet", "test", str(model), "--data", str(fake_root), "--object", "magnetic_tile"]
    assert main([*test, "--out", str(tmp_path / "t")]) == 0
    with open(tmp_path / "t" / "scores.csv", newline="") as fh:
        scored = [row["path"] for row in csv.DictReader(fh)]
    train, expected = (open_magnetic_tile(fake_root, subset, seed=3).paths for subset in ("train", "test"))
    assert expected != open_magnetic_tile(fake_root, "test", seed=0).paths  # the seed matters here
    assert sorted(scored) == sorted(map(str, expected)) and not set(scored) & set(map(str, train))
    assert "split-seed" not in capsys.readouterr().err  # (the PaDiM rank warning may appear: 8 images, d = 8)
    assert main([*test, "--split-seed", "0", "--out", str(tmp_path / "t0")]) == 0
    assert "differs from the seed the model was fitted with (3)" in capsys.readouterr().err
