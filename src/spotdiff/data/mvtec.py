"""Folder layouts: MVTec-AD and VisA after the official ``prepare_data.py`` (or ``spotdiff prepare``).

::

    MVTec-AD:        <root>/<category>/train/good/*.png
                     <root>/<category>/test/{good,<defect>}/*.png
                     <root>/<category>/ground_truth/<defect>/<name>_mask.png
    VisA prepared:   <out>/<split>/<object>/{train,test}/{good,bad}/*.JPG
       1cls:         <out>/<split>/<object>/ground_truth/bad/<name>.png
       2cls_*:       <out>/<split>/<object>/ground_truth/{train,test}/bad/<name>.png

An image's defect type is its folder name; its mask pixels get that folder's class id
(defect folders sorted by name, numbered from 1; 0 is the background).
"""

from __future__ import annotations

from pathlib import Path

from spotdiff.data.dataset import ImageRecord
from spotdiff.data.io import is_image_file
from spotdiff.data.splits import SUBSETS
from spotdiff.errors import DataError

NORMAL_FOLDER = "good"


def _subdirs(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_image_file(p))


def is_object_dir(path: Path) -> bool:
    """True when ``path`` has a ``train/`` or ``test/`` folder (one MVTec category / prepared object)."""
    return (path / "train").is_dir() or (path / "test").is_dir()


def folder_objects(root: Path) -> list[str]:
    """Names of the object/category folders directly under ``root``."""
    return [p.name for p in _subdirs(root) if is_object_dir(p)]


def defect_folders(object_dir: Path) -> list[str]:
    """Sorted names of the defect folders (every image folder except ``good``) in train/ and test/."""
    names = {p.name for s in SUBSETS for p in _subdirs(object_dir / s)}
    names.discard(NORMAL_FOLDER)
    return sorted(names)


def folder_class_names(object_dir: Path) -> dict[int, str]:
    """Class id -> defect folder name (0 = ``BACKGROUND``)."""
    return {0: "BACKGROUND", **{i: name for i, name in enumerate(defect_folders(object_dir), start=1)}}


def _mask_candidates(object_dir: Path, subset: str, defect: str, image: Path) -> list[Path]:
    gt = object_dir / "ground_truth"
    return [
        gt / subset / defect / f"{image.stem}.png",  # VisA prepared, 2-class splits
        gt / defect / f"{image.stem}_mask.png",  # MVTec-AD
        gt / defect / f"{image.stem}.png",  # VisA prepared, 1cls
    ]


def folder_records(object_dir: Path, subset: str) -> list[ImageRecord]:
    """Records of ``<object_dir>/<subset>/<folder>/*`` sorted by folder then file name.

    Raises:
        DataError: missing subset folder, no images, or an anomalous image without a mask
            (naming the image and the mask paths that were tried).
    """
    if subset not in SUBSETS:
        raise DataError(f"unknown subset {subset!r}: expected one of {', '.join(SUBSETS)}")
    subset_dir = object_dir / subset
    if not subset_dir.is_dir():
        raise DataError(f"{subset_dir}: folder not found")
    class_ids = {name: i for i, name in folder_class_names(object_dir).items()}
    records: list[ImageRecord] = []
    for folder in _subdirs(subset_dir):
        normal = folder.name == NORMAL_FOLDER
        for image in _images(folder):
            mask = None
            if not normal:
                tried = _mask_candidates(object_dir, subset, folder.name, image)
                mask = next((m for m in tried if m.is_file()), None)
                if mask is None:
                    raise DataError(f"{image}: anomalous image has no mask (looked for {', '.join(map(str, tried))})")
            records.append(
                ImageRecord(
                    image=image,
                    label=0 if normal else 1,
                    mask=mask,
                    mask_class=None if normal else class_ids[folder.name],
                    defect_type=NORMAL_FOLDER if normal else folder.name,
                    source=str(folder),
                )
            )
    if not records:
        raise DataError(f"{subset_dir}: no images found")
    return records
