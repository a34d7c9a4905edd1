"""`open_dataset`: one entry point for every supported layout, detected from the root folder."""

from __future__ import annotations

import os
from pathlib import Path

from spotdiff.data.dataset import AnomalyDataset, ImageSize
from spotdiff.data.magtile import OBJECT as MAGNETIC_TILE
from spotdiff.data.magtile import is_magnetic_tile_root, open_magnetic_tile
from spotdiff.data.mvtec import folder_class_names, folder_objects, folder_records, is_object_dir
from spotdiff.data.visa import is_visa_root, visa_class_names, visa_records
from spotdiff.errors import DataError

LAYOUTS = ("visa", "folder", "magnetic_tile")


def detect_layout(
    root: str | os.PathLike[str], obj: str, split: str = "1cls", split_csv: str | os.PathLike[str] | None = None
) -> tuple[str, Path]:
    """Which layout ``root`` holds for ``obj``: ``("visa", root)``, ``("folder", <object folder>)``
    or ``("magnetic_tile", <folder holding MT_Free>)``.

    Order: a raw VisA root (``split_csv/`` or ``<object>/Data/Images``, or ``split_csv`` given);
    then ``<root>/<split>/<obj>`` (prepared VisA output folder); then ``<root>/<obj>``
    (MVTec-AD category or one prepared split folder). Before those, with ``obj == "magnetic_tile"``:
    ``root`` or ``<root>/magnetic_tile`` holding ``MT_Free/Imgs``.

    Raises:
        DataError: root missing, object or split not found (lists what is there), or no known layout.
    """
    root = Path(root)
    if root.is_file():
        raise DataError(f"{root}: is a file, not a dataset folder; archives are never unpacked (extract it first)")
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    if obj == MAGNETIC_TILE:
        for candidate in (root, root / obj):
            if is_magnetic_tile_root(candidate):
                return "magnetic_tile", candidate
    if split_csv is not None or is_visa_root(root):
        return "visa", root
    for candidate in (root / split / obj, root / obj):
        if is_object_dir(candidate):
            return "folder", candidate
    objects = folder_objects(root)
    if objects:
        raise DataError(f"unknown object {obj!r} in {root}: available objects: {', '.join(objects)}")
    splits = [p.name for p in sorted(root.iterdir()) if p.is_dir() and folder_objects(p)]
    if splits:
        if split not in splits:
            raise DataError(f"unknown split {split!r} in {root}: available splits: {', '.join(splits)}")
        raise DataError(
            f"unknown object {obj!r} in {root / split}: available objects: {', '.join(folder_objects(root / split))}"
        )
    raise DataError(
        f"{root}: not a recognised dataset root; expected raw VisA (<root>/split_csv/*.csv and "
        "<root>/<object>/Data/Images), MVTec-AD (<root>/<category>/{train,test,ground_truth}) or "
        "prepared VisA (<root>/<split>/<object>/{train,test,ground_truth})"
    )


def open_dataset(
    root: str | os.PathLike[str],
    object: str,  # noqa: A002 - the public name used everywhere (CSV column, CLI flag)
    split: str = "1cls",
    subset: str = "train",
    image_size: ImageSize = 256,
    split_csv: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    id2class: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> AnomalyDataset:
    """Open one object's train or test images, whatever the layout of ``root``.

    Args:
        root: a raw VisA root, an MVTec-AD root, or a prepared VisA folder (see `detect_layout`).
        object: VisA object or MVTec-AD category, e.g. ``"pcb4"``.
        split: VisA split name (``1cls``, ``2cls_fewshot``, ``2cls_highshot``). Raw VisA reads
            ``<root>/split_csv/<split>.csv``; prepared output uses ``<root>/<split>/`` when present.
        subset: ``"train"`` or ``"test"``.
        image_size: int or ``(H, W)`` output size; None keeps each image's native size.
        split_csv: another split CSV for a raw VisA root (``split`` is then only a label).
        skip_bad: decode every file once now and drop those that fail (listed in ``.skipped``);
            otherwise the first bad file raises a DataError when it is read.
        id2class: class-name JSON for raw VisA (default ``<root>/id2class.json`` when present).
        seed: split seed of a layout without an official split (magnetic tile: see
            `spotdiff.data.magtile`); unused otherwise.

    Raises:
        DataError: unknown layout, object, split or subset; missing files; malformed CSV.
    """
    layout, where = detect_layout(root, object, split, split_csv)
    if layout == "magnetic_tile":
        return open_magnetic_tile(where, subset, image_size=image_size, seed=seed, skip_bad=skip_bad)
    if layout == "visa":
        records = visa_records(where, object, split, subset, split_csv)
        names = visa_class_names(where, object, id2class)
        label = f"visa:{object}/{split}/{subset}"
    else:
        records = folder_records(where, subset)
        names = folder_class_names(where)
        label = f"folder:{where.name}/{subset}"
    return AnomalyDataset(records, image_size=image_size, class_names=names, skip_bad=skip_bad, name=label)
