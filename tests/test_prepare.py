"""`spotdiff prepare` on a tiny fake VisA tree built from the official pcb4 rows."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from data_fakes import make_visa_tree, write_split_csv
from PIL import Image

from spotdiff.cli import main
from spotdiff.data import read_split_csv
from spotdiff.data.prepare import prepare_visa
from spotdiff.data.splits import OFFICIAL_SPLITS

OBJECT = "pcb4"


@pytest.fixture(scope="module")
def pcb4_tree(tmp_path_factory, visa_split_dir):
    """A raw VisA root with every pcb4 image and mask (8x10 px) and the three pcb4-only split CSVs."""
    root = tmp_path_factory.mktemp("visa")
    rows = {s: [r for r in read_split_csv(visa_split_dir / f"{s}.csv") if r.object == OBJECT] for s in OFFICIAL_SPLITS}
    make_visa_tree(root, rows["1cls"], split="1cls")
    for split in OFFICIAL_SPLITS[1:]:
        write_split_csv(root / "split_csv" / f"{split}.csv", rows[split])
    return root, rows


def expected_files(rows, split):
    """Relative output paths that the official prepare_data.py writes for ``rows``."""
    name = lambda p: PurePosixPath(p).name  # noqa: E731
    files = set()
    for r in rows:
        label = "good" if r.label == "normal" else "bad"
        files.add(f"{split}/{r.object}/{r.split}/{label}/{name(r.image)}")
        if label == "bad" and split == "1cls" and r.split == "test":
            files.add(f"{split}/{r.object}/ground_truth/bad/{name(r.mask)}")
        if label == "bad" and split != "1cls":
            files.add(f"{split}/{r.object}/ground_truth/{r.split}/bad/{name(r.mask)}")
    return files


def tree(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("split", OFFICIAL_SPLITS)
def test_prepare_matches_official_layout(pcb4_tree, tmp_path, split):
    root, rows = pcb4_tree
    out = tmp_path / "out"
    report = prepare_visa(root, split, out, workers=2)
    expected = expected_files(rows[split], split)
    assert tree(out) == expected
    n_masks = sum(1 for f in expected if "/ground_truth/" in f)
    assert (report.images_written, report.masks_written, report.skipped) == (len(rows[split]), n_masks, 0)
    assert report.objects == [OBJECT] and report.out_dir == out / split
    # Official folders exist even when empty (1cls has no train/bad).
    if split == "1cls":
        assert {p.name for p in (out / split / OBJECT / "ground_truth").iterdir()} == {"bad"}
        assert not (out / split / OBJECT / "train" / "bad").exists()
    else:
        assert (out / split / OBJECT / "ground_truth" / "train" / "bad").is_dir()

    some = [r for r in rows[split] if r.label == "anomaly" and (split != "1cls" or r.split == "test")][:5]
    for r in some:
        gt = (
            out
            / split
            / OBJECT
            / "ground_truth"
            / ("bad" if split == "1cls" else f"{r.split}/bad")
            / PurePosixPath(r.mask).name
        )
        mask = Image.open(gt)
        assert mask.mode == "L" and mask.format == "PNG"
        arr = np.asarray(mask)
        src = np.asarray(Image.open(root / r.mask))
        assert set(np.unique(arr).tolist()) == {0, 255}
        assert np.array_equal(arr == 255, src != 0)
        img_dst = out / split / OBJECT / r.split / "bad" / PurePosixPath(r.image).name
        assert img_dst.read_bytes() == (root / r.image).read_bytes()


def test_second_run_writes_nothing_and_repairs_changes(pcb4_tree, tmp_path):
    root, rows = pcb4_tree
    out = tmp_path / "out"
    first = prepare_visa(root, "2cls_fewshot", out, workers=2)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    second = prepare_visa(root, "2cls_fewshot", out, workers=2)
    assert second.written == 0 and second.skipped == first.written == len(files)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    # A damaged copy (same size, other bytes) and a deleted mask are rewritten; nothing else.
    img = next(p for p in files if p.suffix == ".JPG")
    img.write_bytes(bytes(b ^ 0xFF for b in img.read_bytes()))
    mask = next(p for p in files if "ground_truth" in p.parts)
    mask.unlink()
    third = prepare_visa(root, "2cls_fewshot", out, workers=1)
    assert (third.images_written, third.masks_written) == (1, 1)
    assert tree(out) == {p.relative_to(out).as_posix() for p in files}
    source_folder = {"good": "Normal", "bad": "Anomaly"}[img.parent.name]
    assert img.read_bytes() == (root / OBJECT / "Data" / "Images" / source_folder / img.name).read_bytes()
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name]


def test_prepare_cli(pcb4_tree, tmp_path, capsys):
    root, rows = pcb4_tree
    csv = write_split_csv(
        tmp_path / "few.csv", rows["1cls"][:3] + [r for r in rows["1cls"] if r.label == "anomaly"][:2]
    )
    out = tmp_path / "out"
    argv = [
        "--quiet",
        "prepare",
        "--visa-root",
        str(root),
        "--split",
        "1cls",
        "--split-csv",
        str(csv),
        "--out",
        str(out),
        "--io-threads",
        "1",
    ]
    assert main(argv) == 0
    assert "5 images, 2 masks; 7 file(s) written, 0 already up to date" in capsys.readouterr().out
    assert len(tree(out)) == 7
    assert main(argv) == 0
    assert "0 file(s) written, 7 already up to date" in capsys.readouterr().out
    assert main(["prepare", "--visa-root", str(root), "--split", "1cls", "--out", str(out), "--io-threads", "0"]) == 2
    assert "--io-threads must be >= 1" in capsys.readouterr().err
