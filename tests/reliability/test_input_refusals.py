"""Bad folder input (issues 23 and 25): one line naming the folder or file, exit status 2, nothing written.

Covers masks that match two images (or none), defect-type folders without images, overlapping
sets (the same file, hard links, byte-identical copies), symbolic-link loops and broken links,
non-binary masks, and decompression bombs in images and masks, for `fit` and `test`.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from detect_fakes import tiny_padim_args
from PIL import Image

from spotdiff.cli import main
from spotdiff.detect import PaDiM

SIZE = 24
# as in the CLI (spotdiff.data.io turns PIL's 1x-2x bomb warning into an error); pytest resets warning filters
pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")


def noise_png(path: Path, seed: int, defect: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(90, 140, (SIZE, SIZE, 3), dtype=np.uint8)
    if defect:
        arr[4:10, 4:10] = (250, 20, 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def mask_png(path: Path, values: tuple[int, ...] = (255,)) -> Path:
    arr = np.zeros((SIZE, SIZE), np.uint8)
    for i, v in enumerate(values):
        arr[4 + i, 4:10] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A small PNG whose header declares ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> Path:
    """train/ (8 good), good/ (3), bad/{crack,cut}/000-001.png, masks/{crack,cut}/000-001_mask.png."""
    root = tmp_path_factory.mktemp("line")
    for i in range(8):
        noise_png(root / "train" / f"t{i}.png", i)
    for i in range(3):
        noise_png(root / "good" / f"g{i}.png", 100 + i)
    for k, kind in enumerate(("crack", "cut")):
        for i in range(2):
            noise_png(root / "bad" / kind / f"{i:03d}.png", 200 + 10 * k + i, defect=True)
            mask_png(root / "masks" / kind / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m"
    images = [{"image": np.random.default_rng(i).random((3, SIZE, SIZE), dtype=np.float32)} for i in range(4)]
    import torch

    PaDiM(arch="resnet18", d=8, layers=["layer1"]).fit([{"image": torch.from_numpy(x["image"])} for x in images]).save(
        out
    )
    return out


def _case(name: str, line: Path, tmp: Path) -> tuple[str, list[str], str]:
    """``(command, arguments, text the one error line must hold)`` of each refusal."""
    good, bad, masks, train = (str(line / k) for k in ("good", "bad", "masks", "train"))
    crack, cut = str(line / "bad" / "crack"), str(line / "bad" / "cut")
    if name == "mask_matches_two_images":  # a flat mask folder, the same stem in two defect types
        mask_png(tmp / "flat" / "000_mask.png")
        return (
            "test",
            ["--good", good, "--bad", bad, "--masks", str(tmp / "flat")],
            "000_mask.png: mask matches 2 bad images",
        )
    if name == "mask_suffix_matches_two_images":  # <stem>_mask and the plain stem both name an image
        shutil.copytree(line / "bad" / "crack", tmp / "b" / "crack")
        noise_png(tmp / "b" / "crack" / "000_mask.png", 7, defect=True)
        mask_png(tmp / "m" / "crack" / "000_mask.png")
        mask_png(tmp / "m" / "crack" / "001_mask.png")
        return (
            "test",
            ["--good", good, "--bad", str(tmp / "b"), "--masks", str(tmp / "m")],
            "000_mask.png: mask matches 2 bad images",
        )
    if name == "empty_defect_type":
        shutil.copytree(line / "bad", tmp / "b")
        (tmp / "b" / "dent").mkdir()
        (tmp / "b" / "dent" / "notes.txt").write_text("to do")
        return "test", ["--good", good, "--bad", str(tmp / "b")], "dent: defect-type folder holds no images"
    if name == "mask_suffix_matches_nothing":
        return (
            "test",
            ["--good", good, "--bad", bad, "--masks", masks, "--mask-suffix", "_gt"],
            "--mask-suffix '_gt' matches no mask",
        )
    if name == "good_and_bad_same_folder":
        return "test", ["--good", crack, "--bad", crack], "is the same file as"
    if name == "bad_inside_good":
        return "test", ["--good", str(line / "bad"), "--bad", cut], "is the same file as"
    if name == "good_and_bad_copies":
        shutil.copytree(line / "good", tmp / "copies")
        return "test", ["--good", good, "--bad", str(tmp / "copies")], "is a byte-identical copy of"
    if name == "good_and_bad_hard_links":
        (tmp / "hl").mkdir()
        os.link(line / "good" / "g1.png", tmp / "hl" / "g1.png")
        return "test", ["--good", good, "--bad", str(tmp / "hl")], "is a hard link of"
    if name == "symlink_loop":
        shutil.copytree(line / "bad", tmp / "b")
        (tmp / "b" / "crack" / "again").symlink_to(tmp / "b", target_is_directory=True)
        return "test", ["--good", good, "--bad", str(tmp / "b")], "again: symbolic link loop"
    if name == "folder_given_twice":
        return "test", ["--good", good, "--bad", crack, "--bad", crack], "the same file as"
    if name == "good_type_inside_bad":
        shutil.copytree(line / "bad", tmp / "b")
        shutil.copytree(line / "good", tmp / "b" / "good")
        return "test", ["--good", str(line / "train"), "--bad", str(tmp / "b")], "a bad image in a folder named 'good'"
    if name == "non_binary_mask":
        shutil.copytree(line / "masks", tmp / "m")
        mask_png(tmp / "m" / "cut" / "001_mask.png", (255, 128))
        return "test", ["--good", good, "--bad", bad, "--masks", str(tmp / "m")], "001_mask.png: mask is not binary"
    if name == "bomb_mask_test":
        shutil.copytree(line / "masks", tmp / "m")
        bomb_png(tmp / "m" / "cut" / "001_mask.png")
        return (
            "test",
            ["--good", good, "--bad", bad, "--masks", str(tmp / "m")],
            "001_mask.png: refused as a possible decompression bomb",
        )
    if name == "bomb_mask_between_limits":  # 1x-2x PIL's limit: PIL only warns, we refuse in one line
        shutil.copytree(line / "masks", tmp / "m")
        bomb_png(tmp / "m" / "cut" / "001_mask.png", 10_000, 10_000)
        return "test", ["--good", good, "--bad", bad, "--masks", str(tmp / "m")], "001_mask.png"
    if name == "bomb_mask_fit":
        shutil.copytree(line / "masks", tmp / "m")
        bomb_png(tmp / "m" / "crack" / "000_mask.png")
        return (
            "fit",
            ["--train", train, "--val-bad", bad, "--val-masks", str(tmp / "m")],
            "000_mask.png: refused as a possible decompression bomb",
        )
    if name == "bomb_image_fit":
        shutil.copytree(line / "train", tmp / "t")
        bomb_png(tmp / "t" / "t9.png")
        return "fit", ["--train", str(tmp / "t")], "t9.png: refused as a possible decompression bomb"
    if name == "bomb_image_test":
        shutil.copytree(line / "good", tmp / "g")
        bomb_png(tmp / "g" / "g9.png")
        return "test", ["--good", str(tmp / "g"), "--bad", bad], "g9.png: refused as a possible decompression bomb"
    if name == "dangling_symlink_fit":
        shutil.copytree(line / "train", tmp / "t")
        (tmp / "t" / "t9.png").symlink_to(tmp / "gone.png")
        return "fit", ["--train", str(tmp / "t")], "t9.png"
    if name == "val_good_hard_links_of_train":
        (tmp / "vg").mkdir()
        for p in sorted((line / "train").iterdir())[:2]:
            os.link(p, tmp / "vg" / p.name)
        return "fit", ["--train", train, "--val-good", str(tmp / "vg")], "is a hard link of"
    if name == "val_bad_equals_val_good":  # the good folder again, through a link (a folder named good is refused)
        (tmp / "vb").symlink_to(line / "good", target_is_directory=True)
        return (
            "fit",
            ["--train", train, "--val-good", good, "--val-bad", str(tmp / "vb")],
            "in both the normal validation set and the bad validation set",
        )
    if name == "val_good_copies_of_train":
        shutil.copytree(line / "train", tmp / "vg")
        return "fit", ["--train", train, "--val-good", str(tmp / "vg")], "byte-identical copy"
    raise AssertionError(name)


CASES = [
    "mask_matches_two_images",
    "mask_suffix_matches_two_images",
    "empty_defect_type",
    "mask_suffix_matches_nothing",
    "good_and_bad_same_folder",
    "bad_inside_good",
    "good_and_bad_copies",
    "good_and_bad_hard_links",
    "symlink_loop",
    "folder_given_twice",
    "good_type_inside_bad",
    "non_binary_mask",
    "bomb_mask_test",
    "bomb_mask_between_limits",
    "bomb_mask_fit",
    "bomb_image_fit",
    "bomb_image_test",
    "dangling_symlink_fit",
    "val_good_hard_links_of_train",
    "val_bad_equals_val_good",
    "val_good_copies_of_train",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_folder_input_is_one_line_exit_2_nothing_written(name, line, model_dir, tmp_path, capsys):
    command, args, expected = _case(name, line, tmp_path)
    out = tmp_path / "out"
    if command == "fit":
        argv = [
            "fit",
            *tiny_padim_args(SIZE),
            *args,
            "--out",
            str(out),
        ]
    else:
        argv = ["test", str(model_dir), *args, "--out", str(out)]
    before = sorted(p.name for p in model_dir.iterdir())
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if not x.startswith("warning: the backbone is randomly")]
    assert len(lines) == 1 and lines[0].startswith(f"spotdiff {command}: error: ") and expected in lines[0], err
    assert not out.exists() and sorted(p.name for p in model_dir.iterdir()) == before


def test_the_refusals_name_both_files_of_an_overlap(line, tmp_path, capsys):
    (tmp_path / "hl").mkdir()
    os.link(line / "good" / "g2.png", tmp_path / "hl" / "copy.png")
    assert (
        main(
            [
                "--quiet",
                "fit",
                *tiny_padim_args(SIZE),
                "--train",
                str(line / "train"),
                "--val-good",
                str(line / "good"),
                "--val-bad",
                str(tmp_path / "hl"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(tmp_path / "hl" / "copy.png") in err and str(line / "good" / "g2.png") in err


def test_mask_threshold_accepts_what_the_binary_check_refuses(line, model_dir, tmp_path, capsys):
    shutil.copytree(line / "masks", tmp_path / "m")
    mask_png(tmp_path / "m" / "cut" / "001_mask.png", (255, 128))
    args = [
        "test",
        str(model_dir),
        "--good",
        str(line / "good"),
        "--bad",
        str(line / "bad"),
        "--masks",
        str(tmp_path / "m"),
        "--mask-threshold",
        "127",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(["--quiet", *args]) == 0
    assert "masks matched as <stem>_mask.* for 4 of 4 bad image(s)" in capsys.readouterr().err


def test_a_bomb_in_the_warning_range_is_one_line_in_a_real_interpreter(line, model_dir, tmp_path):
    """Between 1x and 2x the pixel limit PIL only warns; the CLI must still print one line, no warning."""
    from reliability_helpers import assert_clean_error, run_cli

    shutil.copytree(line / "masks", tmp_path / "m")
    bomb = bomb_png(tmp_path / "m" / "cut" / "001_mask.png", 10_000, 10_000)
    proc = run_cli(
        "test",
        model_dir,
        "--good",
        line / "good",
        "--bad",
        line / "bad",
        "--masks",
        tmp_path / "m",
        "--out",
        tmp_path / "r",
    )
    assert_clean_error(proc, bomb)
    assert proc.stderr.count("\n") == 1 and "decompression bomb" in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()
