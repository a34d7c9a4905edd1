"""VisA split CSVs (``object,split,label,image,mask``) and reproducible k-shot sampling.

A split CSV lists one image per row; paths are relative to a VisA root. Rows are validated as
they are read and every error names the CSV file and its row number. Row numbers are file line
numbers: the header is row 1, the first data row is row 2 (what a spreadsheet shows).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spotdiff.errors import DataError

OFFICIAL_SPLITS = ("1cls", "2cls_fewshot", "2cls_highshot")
CSV_HEADER = ("object", "split", "label", "image", "mask")
SUBSETS = ("train", "test")
LABELS = ("normal", "anomaly")

_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class SplitRow:
    """One row of a split CSV.

    ``image`` and ``mask`` are POSIX paths relative to the VisA root; ``mask`` is ``""`` for a
    normal image. ``row`` is the 1-based line number in ``csv_path`` (header = 1).
    """

    object: str
    split: str
    label: str
    image: str
    mask: str
    row: int
    csv_path: str = ""

    @property
    def is_anomaly(self) -> bool:
        return self.label == "anomaly"

    @property
    def where(self) -> str:
        """``"<csv file> row <n>"``, for error messages."""
        return f"{self.csv_path} row {self.row}"


def check_relative_path(value: str, where: str, column: str) -> str:
    """Return ``value`` as a POSIX relative path; DataError if absolute or containing ``..``."""
    if not value:
        raise DataError(f"{where}: empty {column} path")
    if value.startswith(("/", "\\")) or _DRIVE.match(value):
        raise DataError(f"{where}: {column} path {value!r} is absolute; paths must be relative to the dataset root")
    parts = re.split(r"[\\/]", value)
    if ".." in parts:
        raise DataError(f"{where}: {column} path {value!r} contains '..'; paths must stay inside the dataset root")
    clean = "/".join(p for p in parts if p not in ("", "."))
    if not clean:
        raise DataError(f"{where}: {column} path {value!r} does not name a file")
    return clean


def resolve_inside(root: Path, rel: str, where: str, column: str, real_root: Path | None = None) -> Path:
    """``root / rel``; DataError if it resolves (following symlinks) outside ``root``.

    ``rel`` is already checked by `check_relative_path`; this catches a symlink inside the
    dataset that points elsewhere. ``real_root``: ``root.resolve()``, when the caller has it.
    """
    path = root / rel
    real_root = real_root if real_root is not None else root.resolve()
    real = path.resolve()
    if not real.is_relative_to(real_root):
        raise DataError(
            f"{where}: {column} path {rel!r} resolves to {real}, outside the dataset root {root} "
            "(a symlink?); paths must stay inside the dataset root"
        )
    return path


def check_name(value: str, where: str, column: str) -> str:
    """A single, safe path component (an object name): no separators, not ``.`` or ``..``."""
    if not value or value in (".", "..") or re.search(r"[\\/]", value) or _DRIVE.match(value):
        raise DataError(f"{where}: invalid {column} {value!r} (must be a plain folder name)")
    return value


def read_split_csv(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> list[SplitRow]:
    """Read and validate a split CSV.

    Checks: the header is exactly ``object,split,label,image,mask``; ``split`` is train/test;
    ``label`` is normal/anomaly; an anomalous row has a mask and a normal row has none; no image
    appears twice; paths are relative without ``..``. With ``root`` given, each image and mask
    must also exist under it and not resolve outside it through a symlink (nothing is decoded).

    Raises:
        DataError: naming the CSV file and row number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split CSV not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            # (line number where the record ends, fields): exact even for quoted multi-line fields
            lines = [(reader.line_num, fields) for fields in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read split CSV ({exc})") from exc
    if not lines:
        raise DataError(f"{path}: empty split CSV (expected header {','.join(CSV_HEADER)})")
    header = tuple(h.strip() for h in lines[0][1])
    if header != CSV_HEADER:
        raise DataError(f"{path} row 1: header is {','.join(lines[0][1])!r}, expected {','.join(CSV_HEADER)!r}")

    rows: list[SplitRow] = []
    first_row_of: dict[str, int] = {}
    for number, fields in lines[1:]:
        if not fields or all(not f.strip() for f in fields):
            continue  # blank line
        where = f"{path} row {number}"
        if len(fields) != len(CSV_HEADER):
            raise DataError(f"{where}: expected {len(CSV_HEADER)} columns, found {len(fields)}")
        obj, subset, label, image, mask = (f.strip() for f in fields)
        check_name(obj, where, "object")
        if subset not in SUBSETS:
            raise DataError(f"{where}: split {subset!r} is not one of {', '.join(SUBSETS)}")
        if label not in LABELS:
            raise DataError(f"{where}: label {label!r} is not one of {', '.join(LABELS)}")
        image = check_relative_path(image, where, "image")
        if label == "anomaly":
            if not mask:
                raise DataError(f"{where}: anomalous image {image} has no mask")
            mask = check_relative_path(mask, where, "mask")
        elif mask:
            raise DataError(f"{where}: normal image {image} has a mask ({mask}); normal rows leave mask empty")
        if image in first_row_of:
            raise DataError(f"{where}: duplicate image {image} (first listed in row {first_row_of[image]})")
        first_row_of[image] = number
        rows.append(SplitRow(obj, subset, label, image, mask, number, str(path)))

    if root is not None:
        root = Path(root)
        real_root = root.resolve()
        for r in rows:
            for column, rel in (("image", r.image), ("mask", r.mask)):
                if rel and not resolve_inside(root, rel, r.where, column, real_root).is_file():
                    raise DataError(f"{r.where}: {column} file not found: {root / rel}")
    return rows


def sample_kshot(labels: Sequence[int], k: int, seed: int) -> list[int]:
    """Pick ``k`` indices of each class (0 normal, 1 anomalous), without replacement.

    Reproducible: the same ``labels``, ``k`` and ``seed`` always give the same indices
    (``numpy.random.default_rng(seed)``; class 0 is drawn first). Returns sorted indices.

    Raises:
        DataError: a class has fewer than ``k`` images, or a label is not 0/1.
    """
    if k < 1:
        raise DataError(f"k-shot: k must be >= 1, got {k}")
    labels_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    bad = set(np.unique(labels_arr).tolist()) - {0, 1}
    if bad:
        raise DataError(f"k-shot: labels must be 0 (normal) or 1 (anomalous), found {sorted(bad)}")
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for cls, name in ((0, "normal"), (1, "anomalous")):
        pool = np.flatnonzero(labels_arr == cls)
        if len(pool) < k:
            raise DataError(f"k-shot: only {len(pool)} {name} image(s) in the pool, fewer than k={k}")
        chosen.extend(rng.choice(pool, size=k, replace=False).tolist())
    return sorted(chosen)
