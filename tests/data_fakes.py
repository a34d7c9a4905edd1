"""Tiny on-disk datasets for the data-layer tests (raw VisA from official CSV rows, MVTec-AD)."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from spotdiff.data.splits import CSV_HEADER, SplitRow

# Deliberately not square, so a height/width swap shows up.
FAKE_H, FAKE_W = 8, 10


def fake_mask(seed: int, h: int = FAKE_H, w: int = FAKE_W) -> np.ndarray:
    """A class-id mask with two defect classes: id 1 + (seed % 3 + 1) in separate blocks."""
    mask = np.zeros((h, w), np.uint8)
    mask[1:3, 1:4] = 1
    mask[5:7, 6:9] = seed % 3 + 1
    return mask


def write_image(path: Path, seed: int, h: int = FAKE_H, w: int = FAKE_W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def write_split_csv(path: Path, rows: Iterable[SplitRow | tuple[str, ...]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_HEADER)
        for r in rows:
            w.writerow((r.object, r.split, r.label, r.image, r.mask) if isinstance(r, SplitRow) else r)
    return path


def make_visa_tree(root: Path, rows: list[SplitRow], split: str = "1cls") -> Path:
    """Write a tiny raw VisA tree holding exactly the images and masks of ``rows``.

    Images are FAKE_HxFAKE_W JPEGs; masks are PNGs of class ids (see `fake_mask`). The rows go
    to ``<root>/split_csv/<split>.csv``. Returns ``root``.
    """
    for i, r in enumerate(rows):
        if not (root / r.image).exists():
            write_image(root / r.image, seed=i)
        if r.mask and not (root / r.mask).exists():
            (root / r.mask).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(fake_mask(i)).save(root / r.mask)
    write_split_csv(root / "split_csv" / f"{split}.csv", rows)
    return root


def pick_rows(rows: list[SplitRow], obj: str, per_group: int | None) -> list[SplitRow]:
    """The first ``per_group`` rows of ``obj`` for each (split, label) pair (all rows if None)."""
    out: list[SplitRow] = []
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        if r.object != obj:
            continue
        key = (r.split, r.label)
        if per_group is None or counts.get(key, 0) < per_group:
            counts[key] = counts.get(key, 0) + 1
            out.append(r)
    return out


def make_mvtec_tree(root: Path, category: str = "bottle") -> Path:
    """A tiny MVTec-AD category: 3 train/good, 2 test/good, 2 test/broken, 1 test/crack."""
    base = root / category
    for i in range(3):
        write_image(base / "train" / "good" / f"{i:03d}.png", seed=i)
    for i in range(2):
        write_image(base / "test" / "good" / f"{i:03d}.png", seed=10 + i)
    for defect, n in (("broken", 2), ("crack", 1)):
        for i in range(n):
            write_image(base / "test" / defect / f"{i:03d}.png", seed=20 + i)
            m = np.zeros((FAKE_H, FAKE_W), np.uint8)
            m[2:5, 2:5] = 255
            (base / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(base / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root
