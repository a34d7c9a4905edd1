"""Bad input: every error names the file or CSV row; prepare writes nothing when validation fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_fakes import FAKE_H, FAKE_W, fake_mask, make_visa_tree, write_split_csv
from PIL import Image

from spotdiff.cli import main
from spotdiff.data import open_dataset, read_split_csv
from spotdiff.data.prepare import prepare_visa
from spotdiff.data.splits import SplitRow
from spotdiff.errors import DataError

HEADER = "object,split,label,image,mask\n"
GOOD = "obj,train,normal,obj/Data/Images/Normal/0001.JPG,\n"


def _rows() -> list[SplitRow]:
    img, msk = "obj/Data/Images/{}/{}.JPG", "obj/Data/Masks/Anomaly/{}.png"
    rows = [SplitRow("obj", "train", "normal", img.format("Normal", f"{i:04d}"), "", i + 2) for i in range(3)]
    rows.append(SplitRow("obj", "test", "normal", img.format("Normal", "0003"), "", 5))
    rows += [
        SplitRow("obj", "test", "anomaly", img.format("Anomaly", f"{i:03d}"), msk.format(f"{i:03d}"), 6 + i)
        for i in range(2)
    ]
    return rows


@pytest.fixture()
def visa(tmp_path) -> Path:
    """Raw VisA root, object ``obj``: rows 2-4 train normal, 5 test normal, 6-7 test anomalous."""
    return make_visa_tree(tmp_path / "visa", _rows(), split="1cls")


def _image(root: Path, row: int) -> Path:
    return root / _rows()[row - 2].image


def _mask(root: Path, row: int) -> Path:
    return root / _rows()[row - 2].mask


# ----------------------------------------------------------------------------- split CSV rows
@pytest.mark.parametrize(
    "body, row, message",
    [
        ("object,split,label,image\n" + GOOD, 1, "header is"),
        (HEADER + "obj,train,normal\n", 2, "expected 5 columns, found 3"),
        (HEADER + "obj,val,normal,obj/a.JPG,\n", 2, "split 'val' is not one of train, test"),
        (HEADER + "obj,train,bad,obj/a.JPG,\n", 2, "label 'bad' is not one of normal, anomaly"),
        (HEADER + GOOD + "obj,test,anomaly,obj/Data/Images/Anomaly/000.JPG,\n", 3, "anomalous image .* has no mask"),
        (HEADER + "obj,train,normal,obj/a.JPG,obj/a.png\n", 2, "normal image obj/a.JPG has a mask"),
        (
            HEADER + GOOD + "obj,test,normal,obj/Data/Images/Normal/0001.JPG,\n",
            3,
            "duplicate image obj/Data/Images/Normal/0001.JPG \\(first listed in row 2\\)",
        ),
        (HEADER + "obj,train,normal,/etc/passwd.JPG,\n", 2, "is absolute"),
        (HEADER + "obj,train,normal,C:\\\\data\\\\a.JPG,\n", 2, "is absolute"),
        (HEADER + "obj,train,normal,obj/../../a.JPG,\n", 2, "contains '..'"),
        (HEADER + "obj,test,anomaly,obj/a.JPG,obj\\\\..\\\\..\\\\m.png\n", 2, "mask path .* contains '..'"),
        (HEADER + "../obj,train,normal,obj/a.JPG,\n", 2, "invalid object '../obj'"),
        (HEADER + ",train,normal,obj/a.JPG,\n", 2, "invalid object ''"),
        (HEADER + "obj,train,normal,,\n", 2, "empty image path"),
        ("", 1, "empty split CSV"),
    ],
)
def test_bad_csv_rows_name_file_and_row(tmp_path, body, row, message):
    csv = tmp_path / "split.csv"
    csv.write_text(body.replace("\\\\", "\\"))
    with pytest.raises(DataError, match=message) as err:
        read_split_csv(csv)
    text = str(err.value)
    assert str(csv) in text
    if row > 1 or "header" in message:
        assert f"row {row}" in text


def test_missing_csv(tmp_path):
    with pytest.raises(DataError, match="nope.csv: split CSV not found"):
        read_split_csv(tmp_path / "nope.csv")


# ----------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("which", ["image", "mask"])
def test_missing_file_fails_at_construction(visa, which):
    path = _image(visa, 6) if which == "image" else _mask(visa, 6)
    path.unlink()
    with pytest.raises(DataError, match="file not found") as err:
        open_dataset(visa, "obj", subset="test")
    assert str(path) in str(err.value) and "1cls.csv row 6" in str(err.value)


def _corrupt(path: Path, kind: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"zero": b"", "truncated": data[: len(data) // 2], "garbage": b"\xff\xd8\xffnot a jpeg"}[kind])


@pytest.mark.parametrize(
    "kind, message", [("zero", "empty file"), ("truncated", "cannot read image"), ("garbage", "cannot read image")]
)
def test_bad_image_fails_when_read(visa, kind, message):
    bad = _image(visa, 3)
    _corrupt(bad, kind)
    ds = open_dataset(visa, "obj", subset="train", image_size=8)  # construction only stats files
    ds[0]
    with pytest.raises(DataError, match=message) as err:
        ds[1]
    assert str(bad) in str(err.value)


def _wrong_size_mask(root: Path, row: int) -> Path:
    path = _mask(root, row)
    Image.fromarray(fake_mask(0, FAKE_H + 2, FAKE_W)).save(path)
    return path


def test_mask_size_mismatch_names_both_files(visa):
    mask = _wrong_size_mask(visa, 7)
    ds = open_dataset(visa, "obj", subset="test", image_size=8)
    with pytest.raises(DataError, match="is 10x10 but image .* is 10x8") as err:
        ds[2]
    assert str(mask) in str(err.value) and str(_image(visa, 7)) in str(err.value)


def test_skip_bad_drops_unreadable_files_and_reports_them(visa, capsys):
    _corrupt(_image(visa, 3), "truncated")
    _image(visa, 4).unlink()
    _wrong_size_mask(visa, 7)
    train = open_dataset(visa, "obj", subset="train", image_size=8, skip_bad=True)
    assert len(train) == 1 and train.paths == [str(_image(visa, 2))]
    assert [p for p, _ in train.skipped] == [str(_image(visa, 3)), str(_image(visa, 4))]
    assert "cannot read image" in train.skipped[0][1] and "file not found" in train.skipped[1][1]
    assert "skipped 2 of 3 image(s)" in capsys.readouterr().err
    test = open_dataset(visa, "obj", subset="test", image_size=8, skip_bad=True)
    assert test.labels == [0, 1] and test.skipped[0][0] == str(_image(visa, 7))
    assert [test[i]["label"] for i in range(len(test))] == [0, 1]


def test_unknown_object_and_split(visa):
    with pytest.raises(DataError, match="unknown object 'pcb4' in .*: available objects: obj"):
        open_dataset(visa, "pcb4")
    with pytest.raises(DataError, match="unknown split '4cls'"):
        open_dataset(visa, "obj", split="4cls")


# ----------------------------------------------------------------------------- prepare
def _assert_nothing_written(out: Path) -> None:
    assert not out.exists(), sorted(out.rglob("*"))


@pytest.mark.parametrize(
    "damage, row, message",
    [
        (lambda r: _image(r, 3).unlink(), 3, "file not found"),
        (lambda r: _mask(r, 6).unlink(), 6, "file not found"),
        (lambda r: _corrupt(_image(r, 4), "zero"), 4, "empty file"),
        (lambda r: _corrupt(_image(r, 4), "truncated"), 4, "cannot read image"),
        (lambda r: _corrupt(_image(r, 6), "garbage"), 6, "cannot read image"),
        (lambda r: _corrupt(_mask(r, 7), "garbage"), 7, "cannot read image"),
        (lambda r: _wrong_size_mask(r, 7), 7, "is 10x10 but image"),
    ],
)
def test_prepare_validates_everything_before_writing(visa, tmp_path, damage, row, message):
    damage(visa)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as err:
        prepare_visa(visa, "1cls", out, workers=2)
    text = str(err.value)
    assert f"1cls.csv row {row}" in text and "nothing was written" in text
    assert str(_image(visa, row)) in text or str(_mask(visa, row)) in text
    _assert_nothing_written(out)


def test_prepare_lists_every_bad_row(visa, tmp_path):
    _image(visa, 2).unlink()
    _corrupt(_image(visa, 5), "zero")
    with pytest.raises(DataError, match="2 of 6 row\\(s\\) failed validation") as err:
        prepare_visa(visa, "1cls", tmp_path / "out")
    assert "row 2" in str(err.value) and "row 5" in str(err.value)
    _assert_nothing_written(tmp_path / "out")


def test_prepare_bad_csv_writes_nothing(visa, tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text(HEADER + GOOD + "obj,test,anomaly,obj/Data/Images/Anomaly/000.JPG,\n")
    with pytest.raises(DataError, match="bad.csv row 3: anomalous image"):
        prepare_visa(visa, "2cls_fewshot", tmp_path / "out", split_csv=csv)
    _assert_nothing_written(tmp_path / "out")


def test_prepare_refuses_colliding_destinations(visa, tmp_path):
    other = visa / "obj" / "Data" / "Images" / "Extra" / "0001.JPG"
    other.parent.mkdir()
    other.write_bytes(_image(visa, 3).read_bytes())
    csv = write_split_csv(
        tmp_path / "dup.csv",
        [tuple(GOOD.strip().split(",")), ("obj", "train", "normal", "obj/Data/Images/Extra/0001.JPG", "")],
    )
    with pytest.raises(DataError, match="dup.csv row 3: destination .*train/good/0001.JPG is also written by row 2"):
        prepare_visa(visa, "1cls", tmp_path / "out", split_csv=csv)
    _assert_nothing_written(tmp_path / "out")


def test_prepare_never_writes_outside_out(visa, tmp_path):
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "1cls").mkdir(parents=True)
    (out / "1cls" / "obj").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DataError, match="1cls.csv row 2: destination .* resolves outside the output folder"):
        prepare_visa(visa, "1cls", out)
    assert list(elsewhere.iterdir()) == []
    assert sorted(p.name for p in out.rglob("*")) == ["1cls", "obj"]


def test_prepare_unknown_split_and_root(visa, tmp_path):
    with pytest.raises(DataError, match="unknown split '3cls'"):
        prepare_visa(visa, "3cls", tmp_path / "out")
    with pytest.raises(DataError, match="nowhere: VisA root not found"):
        prepare_visa(tmp_path / "nowhere", "1cls", tmp_path / "out")
    with pytest.raises(DataError, match="split_csv/2cls_highshot.csv: split CSV not found"):
        prepare_visa(visa, "2cls_highshot", tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_prepare_cli_reports_bad_input(visa, tmp_path, capsys):
    bad = _image(visa, 6)
    _corrupt(bad, "truncated")
    code = main(["--quiet", "prepare", "--visa-root", str(visa), "--split", "1cls", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("spotdiff prepare: error: 1 of 6 row(s) failed validation")
    assert str(bad) in err and "row 6" in err
    _assert_nothing_written(tmp_path / "out")


def test_prepared_masks_are_binary_after_good_run(visa, tmp_path):
    report = prepare_visa(visa, "1cls", tmp_path / "out")
    assert (report.images_written, report.masks_written) == (6, 2)
    for m in (tmp_path / "out" / "1cls" / "obj" / "ground_truth" / "bad").iterdir():
        assert set(np.unique(np.asarray(Image.open(m))).tolist()) == {0, 255}


def test_prepare_output_problems_are_data_errors(visa, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="file: output path exists and is not a folder"):
        prepare_visa(visa, "1cls", tmp_path / "file")
    out = tmp_path / "out"
    blocker = out / "1cls" / "obj" / "train" / "good" / "0000.JPG"
    blocker.mkdir(parents=True)  # a folder where an image must go
    with pytest.raises(DataError, match="0000.JPG: cannot write .* for .*1cls.csv row 2"):
        prepare_visa(visa, "1cls", out, workers=1)


@pytest.mark.parametrize("size", [0, (8,), (8, -1)])
def test_bad_image_size_is_a_config_error(visa, size):
    from spotdiff.errors import ConfigError

    with pytest.raises(ConfigError, match="image_size"):
        open_dataset(visa, "obj", image_size=size)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # refused by our own check
@pytest.mark.parametrize("kind", ["truncated", "garbage", "text", "bomb"])
def test_image_bytes_fail_as_the_file_does(tmp_path, kind):
    """`load_image_bytes` (an upload) and `load_image` (a file) are one decode path: the same error."""
    from spotdiff.data.io import ImageTooLarge, load_image, load_image_bytes

    path = tmp_path / "part.png"
    size = (10_000, 9_000) if kind == "bomb" else (40, 30)  # 90 Mpx: over MAX_IMAGE_PIXELS
    Image.new("1" if kind == "bomb" else "RGB", size).save(path)
    data = path.read_bytes()
    data = {
        "truncated": data[: len(data) // 2],
        "garbage": b"\x89PNG\r\n\x1a\nnot a png",
        "text": b"hello",
        "bomb": data,
    }[kind]
    path.write_bytes(data)
    with pytest.raises(DataError) as from_file:
        load_image(path)
    with pytest.raises(DataError) as from_bytes:
        load_image_bytes(data, str(path))
    assert str(from_bytes.value) == str(from_file.value) and str(path) in str(from_file.value)
    assert isinstance(from_bytes.value, ImageTooLarge) == (kind == "bomb")
    assert ("cannot read image" in str(from_file.value)) == (kind != "bomb")
    with pytest.raises(DataError, match="upload: empty"):
        load_image_bytes(b"", "upload")
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30)).save(good)
    with pytest.raises(ImageTooLarge, match="upload: image of 40x30 pixels exceeds the limit of 1000 pixels"):
        load_image_bytes(good.read_bytes(), "upload", max_pixels=1000)
