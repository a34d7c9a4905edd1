"""Split CSV reading (official VisA counts) and reproducible, balanced k-shot sampling."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotdiff.data import read_split_csv, sample_kshot
from spotdiff.data.splits import OFFICIAL_SPLITS, check_relative_path
from spotdiff.errors import DataError

# (split, label) -> number of rows, from the VisA paper / official split files.
OFFICIAL_COUNTS = {
    "1cls": {("train", "normal"): 8659, ("test", "normal"): 962, ("test", "anomaly"): 1200},
    "2cls_highshot": {
        ("train", "normal"): 5773,
        ("train", "anomaly"): 720,
        ("test", "normal"): 3848,
        ("test", "anomaly"): 480,
    },
    "2cls_fewshot": {
        ("train", "normal"): 1924,
        ("train", "anomaly"): 240,
        ("test", "normal"): 7697,
        ("test", "anomaly"): 960,
    },
}
VISA_OBJECTS = {
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
}


@pytest.mark.parametrize("split", OFFICIAL_SPLITS)
def test_official_split_counts(visa_split_dir, split):
    rows = read_split_csv(visa_split_dir / f"{split}.csv")
    assert Counter((r.split, r.label) for r in rows) == OFFICIAL_COUNTS[split]
    assert {r.object for r in rows} == VISA_OBJECTS
    # Every image of VisA (10,821) appears exactly once in each split.
    assert len({r.image for r in rows}) == len(rows) == 10821
    assert all(bool(r.mask) == r.is_anomaly for r in rows)
    assert rows[0].row == 2 and rows[-1].row == 10822


def test_official_splits_partition_the_same_images(visa_split_dir):
    images = [{r.image for r in read_split_csv(visa_split_dir / f"{s}.csv")} for s in OFFICIAL_SPLITS]
    assert images[0] == images[1] == images[2]


def test_rows_keep_file_line_numbers(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text(
        "object,split,label,image,mask\n"
        "a,train,normal,a/Data/Images/Normal/1.JPG,\n"
        "\n"
        "a,test,anomaly,a/Data/Images/Anomaly/2.JPG,a/Data/Masks/Anomaly/2.png\n"
    )
    rows = read_split_csv(csv)
    assert [r.row for r in rows] == [2, 4]
    assert rows[1].is_anomaly and rows[1].mask == "a/Data/Masks/Anomaly/2.png"
    assert rows[1].where == f"{csv} row 4"


def test_root_argument_checks_files_exist(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("object,split,label,image,mask\na,train,normal,a/1.JPG,\n")
    with pytest.raises(DataError, match="row 2: image file not found") as err:
        read_split_csv(csv, root=tmp_path)
    assert str(csv) in str(err.value) and "a/1.JPG" in str(err.value)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.JPG").write_bytes(b"x")
    assert len(read_split_csv(csv, root=tmp_path)) == 1


def test_kshot_is_reproducible_balanced_and_sorted():
    labels = [0] * 50 + [1] * 12
    a = sample_kshot(labels, 5, seed=3)
    assert a == sample_kshot(labels, 5, seed=3)
    assert a == sorted(a) and len(set(a)) == 10
    assert Counter(labels[i] for i in a) == {0: 5, 1: 5}
    draws = {tuple(sample_kshot(labels, 5, seed=s)) for s in range(10)}
    assert len(draws) > 5  # different seeds give different draws


def test_kshot_draws_cover_the_pool_uniformly():
    labels = np.array([0] * 20 + [1] * 10)
    hits = np.zeros(30)
    for seed in range(400):
        hits[sample_kshot(labels, 5, seed)] += 1
    # Expected hits: 400 * 5/20 = 100 per normal, 400 * 5/10 = 200 per anomalous image.
    assert np.all(np.abs(hits[:20] - 100) < 40) and np.all(np.abs(hits[20:] - 200) < 50)


def test_kshot_with_k_equal_pool_takes_everything():
    labels = [1, 0, 1, 0]
    assert sample_kshot(labels, 2, seed=0) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "labels, k, message",
    [
        ([0] * 10 + [1] * 3, 5, "only 3 anomalous image"),
        ([0] * 2 + [1] * 10, 5, "only 2 normal image"),
        ([0, 1, 2], 1, "must be 0"),
        ([0, 1], 0, "k must be >= 1"),
    ],
)
def test_kshot_errors(labels, k, message):
    with pytest.raises(DataError, match=message):
        sample_kshot(labels, k, seed=0)


def test_kshot_on_official_fewshot_pool(visa_split_dir):
    rows = [r for r in read_split_csv(visa_split_dir / "2cls_fewshot.csv") if r.object == "pcb4" and r.split == "train"]
    labels = [int(r.is_anomaly) for r in rows]
    for k in (5, 10):
        picked = sample_kshot(labels, k, seed=0)
        assert Counter(labels[i] for i in picked) == {0: k, 1: k}


@given(st.lists(st.sampled_from(["a", "b.JPG", "..", ".", "", "/", "\\", "C:", "x y"]), max_size=6).map("".join))
def test_accepted_paths_never_escape_the_root(value):
    try:
        clean = check_relative_path(value, "t.csv row 2", "image")
    except DataError as exc:
        assert "t.csv row 2" in str(exc)
        return
    parts = clean.split("/")
    assert ".." not in parts and not clean.startswith("/") and "\\" not in clean and clean


def test_quoted_multiline_field_keeps_row_numbers(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text('object,split,label,image,mask\na,train,normal,"a/x\ny.JPG",\na,val,normal,a/2.JPG,\n')
    with pytest.raises(DataError, match="row 4: split 'val'"):
        read_split_csv(csv)
