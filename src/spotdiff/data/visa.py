"""The raw VisA layout, read in place (no copy, no ``prepare`` needed).

::

    <root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<object>/Data/Masks/Anomaly/*.png      # uint8 class ids, 0 = background
    <root>/<object>/image_anno.csv
    <root>/split_csv/{1cls,2cls_fewshot,2cls_highshot}.csv
    <root>/id2class.json                            # optional: {object: {"0": "BACKGROUND", "1": name, ...}}
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from spotdiff.data.dataset import ImageRecord
from spotdiff.data.splits import OFFICIAL_SPLITS, SUBSETS, SplitRow, read_split_csv, resolve_inside
from spotdiff.errors import DataError

ID2CLASS_FILE = "id2class.json"
SPLIT_CSV_DIR = "split_csv"


def is_visa_root(root: Path) -> bool:
    """True when ``root`` looks like a raw VisA root (a ``split_csv/`` folder or ``<object>/Data/Images``)."""
    if (root / SPLIT_CSV_DIR).is_dir():
        return True
    return root.is_dir() and any((child / "Data" / "Images").is_dir() for child in root.iterdir())


def split_csv_path(root: Path, split: str, split_csv: str | os.PathLike[str] | None = None) -> Path:
    """The split CSV to read: ``split_csv`` when given, else ``<root>/split_csv/<split>.csv``.

    Raises:
        DataError: unknown split name (lists the available ones) or missing CSV.
    """
    if split_csv is not None:
        path = Path(split_csv)
        if not path.is_file():
            raise DataError(f"{path}: split CSV not found")
        return path
    path = root / SPLIT_CSV_DIR / f"{split}.csv"
    if path.is_file():
        return path
    present = sorted(p.stem for p in (root / SPLIT_CSV_DIR).glob("*.csv"))
    if split not in OFFICIAL_SPLITS and split not in present:
        raise DataError(
            f"unknown split {split!r}: expected one of {', '.join(sorted(set(OFFICIAL_SPLITS) | set(present)))}"
        )
    raise DataError(f"{path}: split CSV not found (pass split_csv=... to use another file)")


def load_id2class(path: str | os.PathLike[str]) -> dict[str, dict[int, str]]:
    """Read an ``id2class.json``: ``{object: {"<id>": name}}`` -> ``{object: {id: name}}``.

    Raises:
        DataError: unreadable JSON or a malformed entry, naming the file.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: id2class file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read id2class JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object {{object: {{id: name}}}}")
    table: dict[str, dict[int, str]] = {}
    for obj, names in raw.items():
        if not isinstance(names, dict):
            raise DataError(f"{path}: entry {obj!r} is not an object of id -> name")
        try:
            table[obj] = {int(k): str(v) for k, v in names.items()}
        except ValueError as exc:
            raise DataError(f"{path}: entry {obj!r} has a non-integer class id ({exc})") from exc
    return table


def visa_class_names(root: Path, obj: str, id2class: str | os.PathLike[str] | None = None) -> dict[int, str]:
    """Defect-class names of ``obj`` from ``id2class`` or ``<root>/id2class.json``; ``{0: BACKGROUND}`` if neither."""
    path = Path(id2class) if id2class is not None else root / ID2CLASS_FILE
    if id2class is None and not path.is_file():
        return {0: "BACKGROUND"}
    names = load_id2class(path).get(obj, {})
    return {0: "BACKGROUND", **names}


def visa_records(
    root: Path, obj: str, split: str = "1cls", subset: str = "train", split_csv: str | os.PathLike[str] | None = None
) -> list[ImageRecord]:
    """The rows of ``obj`` / ``subset`` in a split CSV as `ImageRecord`s (CSV order).

    Raises:
        DataError: unknown split, subset or object (the error lists the available objects),
            a malformed CSV row, or a row whose file resolves outside ``root`` (symlink).
    """
    if subset not in SUBSETS:
        raise DataError(f"unknown subset {subset!r}: expected one of {', '.join(SUBSETS)}")
    path = split_csv_path(root, split, split_csv)
    stat = path.stat()
    rows = _read_split_csv_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    objects = sorted({r.object for r in rows})
    if obj not in objects:
        raise DataError(f"unknown object {obj!r} in {root}: available objects: {', '.join(objects)}")
    real_root = root.resolve()
    return [_to_record(root, r, real_root) for r in rows if r.object == obj and r.split == subset]


@functools.lru_cache(maxsize=8)
def _read_split_csv_cached(path: str, mtime_ns: int, size: int) -> tuple[SplitRow, ...]:
    """`read_split_csv`, parsed once per file version (opening 12 objects x 2 subsets reads it once)."""
    return tuple(read_split_csv(path))


def _to_record(root: Path, row: SplitRow, real_root: Path) -> ImageRecord:
    return ImageRecord(
        image=resolve_inside(root, row.image, row.where, "image", real_root),
        label=int(row.is_anomaly),
        mask=resolve_inside(root, row.mask, row.where, "mask", real_root) if row.mask else None,
        source=row.where,
    )
