"""open_dataset on raw VisA (read in place), MVTec-AD and prepared layouts; ImageFolderDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fakes import FAKE_H, FAKE_W, fake_mask, make_mvtec_tree, make_visa_tree, pick_rows, write_image
from PIL import Image
from torch.utils.data import DataLoader

from spotdiff.data import ImageFolderDataset, detect_layout, load_id2class, open_dataset, read_split_csv, sample_kshot
from spotdiff.errors import DataError


@pytest.fixture(scope="module")
def pcb4_rows(visa_split_dir):
    """4 rows of each (split, label) group of pcb4 in the official 2cls_fewshot CSV."""
    return pick_rows(read_split_csv(visa_split_dir / "2cls_fewshot.csv"), "pcb4", per_group=4)


@pytest.fixture()
def visa_root(tmp_path, pcb4_rows):
    return make_visa_tree(tmp_path / "visa", pcb4_rows, split="2cls_fewshot")


def test_id2class_has_every_object(visa_id2class):
    table = load_id2class(visa_id2class)
    assert len(table) == 12 and table["pcb4"][0] == "BACKGROUND" and len(table["pcb4"]) > 2


def test_raw_visa_items(visa_root, visa_id2class, pcb4_rows):
    ds = open_dataset(visa_root, "pcb4", split="2cls_fewshot", subset="test", image_size=16, id2class=visa_id2class)
    expected = [r for r in pcb4_rows if r.split == "test"]
    assert len(ds) == len(expected) == 8
    assert ds.paths == [str(visa_root / r.image) for r in expected]
    assert ds.labels == [int(r.is_anomaly) for r in expected]
    names = load_id2class(visa_id2class)["pcb4"]
    assert ds.class_names == names
    for i, row in enumerate(expected):
        item = ds[i]
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["mask"].shape == (16, 16) and item["mask"].dtype == torch.float32
        assert item["class_mask"].dtype == torch.int64
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(item["mask"] > 0, item["class_mask"] > 0)
        assert item["label"] == int(row.is_anomaly) and item["path"] == str(visa_root / row.image)
        if row.is_anomaly:
            ids = sorted(np.unique(np.asarray(Image.open(visa_root / row.mask))).tolist())[1:]
            assert item["defect_type"] == "+".join(names[j] for j in ids)
            assert set(item["class_mask"].unique().tolist()) == {0, *ids}
        else:
            assert item["defect_type"] == "good" and item["mask"].sum() == 0


def test_native_size_and_rectangular_size(visa_root):
    native = open_dataset(visa_root, "pcb4", split="2cls_fewshot", subset="train", image_size=None)
    item = native[len(native) - 1]  # an anomalous train image
    assert item["label"] == 1 and item["image"].shape == (3, FAKE_H, FAKE_W)
    mask_on_disk = fake_mask(0)  # class ids are kept exactly at native size
    assert item["class_mask"].shape == mask_on_disk.shape
    rect = open_dataset(visa_root, "pcb4", split="2cls_fewshot", subset="train", image_size=(12, 20))
    assert rect[0]["image"].shape == (3, 12, 20) and rect[0]["mask"].shape == (12, 20)


def test_fallback_class_names_without_id2class(visa_root):
    ds = open_dataset(visa_root, "pcb4", split="2cls_fewshot", subset="test", image_size=8)
    types = [ds[i]["defect_type"] for i in range(len(ds)) if ds.labels[i] == 1]
    assert set(types) == {"class_1", "class_1+class_2", "class_1+class_3"}


def test_default_id2class_file_in_root(visa_root, visa_id2class):
    (visa_root / "id2class.json").write_bytes(visa_id2class.read_bytes())
    ds = open_dataset(visa_root, "pcb4", split="2cls_fewshot", subset="test", image_size=8)
    assert ds.class_names[1] == load_id2class(visa_id2class)["pcb4"][1]


def test_dataloader_batches_and_kshot_subset(visa_root):
    ds = open_dataset(visa_root, "pcb4", split="2cls_fewshot", subset="train", image_size=16)
    few = ds.subset(sample_kshot(ds.labels, 2, seed=1))
    assert len(few) == 4 and sorted(few.labels) == [0, 0, 1, 1]
    batch = next(iter(DataLoader(few, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 16, 16)
    assert batch["label"].tolist() == few.labels and batch["path"] == few.paths


def test_split_csv_argument(visa_root, pcb4_rows, tmp_path):
    from data_fakes import write_split_csv

    custom = write_split_csv(tmp_path / "mine.csv", [r for r in pcb4_rows if r.label == "normal"])
    ds = open_dataset(visa_root, "pcb4", split="anything", subset="test", split_csv=custom, image_size=8)
    assert len(ds) == 4 and ds.labels == [0] * 4


def test_unknown_object_lists_available(visa_root):
    with pytest.raises(DataError, match=r"unknown object 'pcb9'.*available objects: pcb4"):
        open_dataset(visa_root, "pcb9", split="2cls_fewshot")


def test_unknown_split_and_subset(visa_root):
    with pytest.raises(DataError, match=r"unknown split '3cls'.*2cls_fewshot"):
        open_dataset(visa_root, "pcb4", split="3cls")
    with pytest.raises(DataError, match="split_csv/1cls.csv: split CSV not found"):
        open_dataset(visa_root, "pcb4", split="1cls")
    with pytest.raises(DataError, match="unknown subset 'val'"):
        open_dataset(visa_root, "pcb4", split="2cls_fewshot", subset="val")


def test_mvtec_layout(tmp_path):
    root = make_mvtec_tree(tmp_path / "mvtec", "bottle")
    assert detect_layout(root, "bottle") == ("folder", root / "bottle")
    train = open_dataset(root, "bottle", subset="train", image_size=None)
    assert len(train) == 3 and train.labels == [0, 0, 0]
    test = open_dataset(root, "bottle", subset="test", image_size=8)
    assert test.class_names == {0: "BACKGROUND", 1: "broken", 2: "crack"}
    assert test.labels == [1, 1, 1, 0, 0]  # folders sorted: broken, crack, good
    items = [test[i] for i in range(len(test))]
    assert [it["defect_type"] for it in items] == ["broken", "broken", "crack", "good", "good"]
    assert set(items[2]["class_mask"].unique().tolist()) == {0, 2}
    assert items[0]["mask"].sum() > 0 and items[3]["mask"].sum() == 0
    with pytest.raises(DataError, match="unknown object 'cable'.*available objects: bottle"):
        open_dataset(root, "cable")


def test_mvtec_anomaly_without_mask(tmp_path):
    root = make_mvtec_tree(tmp_path / "mvtec", "bottle")
    (root / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(DataError, match=r"test/crack/000.png: anomalous image has no mask"):
        open_dataset(root, "bottle", subset="test")


def _prepared_tree(base, two_class):
    obj = base / "pcb4"
    for subset in ("train", "test"):
        write_image(obj / subset / "good" / "0001.JPG", seed=1)
        if two_class or subset == "test":
            write_image(obj / subset / "bad" / "000.JPG", seed=2)
            gt = obj / "ground_truth" / (f"{subset}/bad" if two_class else "bad")
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray((fake_mask(0) > 0).astype(np.uint8) * 255).save(gt / "000.png")


@pytest.mark.parametrize("split", ["1cls", "2cls_fewshot"])
def test_prepared_visa_layout(tmp_path, split):
    _prepared_tree(tmp_path / "out" / split, two_class=split != "1cls")
    # Either the prepare output folder with a split name, or the split folder itself.
    for root in (tmp_path / "out", tmp_path / "out" / split):
        train = open_dataset(root, "pcb4", split=split, subset="train", image_size=8)
        assert train.labels == ([0] if split == "1cls" else [1, 0])
        test = open_dataset(root, "pcb4", split=split, subset="test", image_size=None)
        item = test[0]
        assert item["defect_type"] == "bad" and test.class_names == {0: "BACKGROUND", 1: "bad"}
        assert torch.equal(item["mask"].bool(), torch.from_numpy(fake_mask(0) > 0))
    with pytest.raises(DataError, match="unknown split '2cls_highshot'.*available splits"):
        open_dataset(tmp_path / "out", "pcb4", split="2cls_highshot")


def test_unrecognised_root(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="not a recognised dataset root"):
        open_dataset(tmp_path / "junk", "pcb4")
    with pytest.raises(DataError, match="dataset root not found"):
        open_dataset(tmp_path / "nowhere", "pcb4")


def test_image_folder_dataset(tmp_path):
    for name in ("b.png", "a.JPG", "c.bmp"):
        write_image(tmp_path / "imgs" / name, seed=0)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"")
    write_image(tmp_path / "imgs" / "sub" / "d.png", seed=0)
    ds = ImageFolderDataset(tmp_path / "imgs", image_size=16)
    assert [p.rsplit("/", 1)[1] for p in ds.paths] == ["a.JPG", "b.png", "c.bmp"]
    assert ds[0]["image"].shape == (3, 16, 16) and ds[0]["path"] == ds.paths[0]
    assert len(ImageFolderDataset(tmp_path / "imgs", recursive=True)) == 4
    files = ImageFolderDataset([tmp_path / "imgs" / "c.bmp", tmp_path / "imgs" / "a.JPG"], image_size=None)
    assert files.paths[0].endswith("c.bmp") and files[0]["image"].shape == (3, FAKE_H, FAKE_W)


def test_image_folder_dataset_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files found in .*empty"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(DataError, match="missing.png: no such file"):
        ImageFolderDataset(tmp_path / "missing.png")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError, match="x.txt: not an image file"):
        ImageFolderDataset([tmp_path / "x.txt"])


def test_synthetic_dataset_reads_and_prepares(tmp_path):
    """The synth helper's VisA-format output: every split opens, every item loads, prepare round-trips."""
    from spotdiff.data.prepare import prepare_visa
    from spotdiff.data.synth import generate

    root = generate(tmp_path / "synth", seed=0, scale=0.1, image_size=64, objects=["cashew_synth"])
    for split in ("1cls", "2cls_fewshot", "2cls_highshot"):
        for subset in ("train", "test"):
            ds = open_dataset(root, "cashew_synth", split=split, subset=subset, image_size=None)
            items = [ds[i] for i in range(len(ds))]
            assert all(it["image"].shape == (3, 64, 64) for it in items)
            assert all((it["mask"].sum() > 0) == bool(it["label"]) for it in items)
            assert all(not it["defect_type"].startswith("class_") for it in items)  # id2class.json is used
        prepare_visa(root, split, tmp_path / "out", workers=1)
        prepared = open_dataset(tmp_path / "out", "cashew_synth", split=split, subset="test", image_size=None)
        raw = open_dataset(root, "cashew_synth", split=split, subset="test", image_size=None)
        assert sorted(prepared.labels) == sorted(raw.labels)
        assert sorted(p.rsplit("/", 1)[1] for p in prepared.paths) == sorted(p.rsplit("/", 1)[1] for p in raw.paths)


def test_split_csv_edits_are_picked_up(visa_root, pcb4_rows):
    from data_fakes import write_split_csv

    before = open_dataset(visa_root, "pcb4", split="2cls_fewshot", subset="test", image_size=8)
    write_split_csv(visa_root / "split_csv" / "2cls_fewshot.csv", [r for r in pcb4_rows if r.label == "normal"])
    after = open_dataset(visa_root, "pcb4", split="2cls_fewshot", subset="test", image_size=8)
    assert (len(before), len(after)) == (8, 4)
