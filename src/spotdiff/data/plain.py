"""Plain folders: a folder (or list) of good images, optionally bad images and their masks.

This is the layout of a production line: no split CSVs, no object names. Bad images are matched
to masks by file stem (``scratch_01.jpg`` <-> ``scratch_01.png``); a mask without an image, two
masks with one stem, or a mask of another size than its image is refused before anything is fitted
or written. Bad images without a mask are allowed (image-level metrics only use them; their
pixels count as normal in pixel metrics) and listed in ``FolderSet.unmasked``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from spotdiff.data.dataset import AnomalyDataset, ImageRecord, ImageSize
from spotdiff.data.folder import list_images
from spotdiff.errors import DataError

PathLike = str | os.PathLike[str]
Images = PathLike | Sequence[PathLike]

VAL_FRACTION = 0.2
"""Share of the training images held out for calibration when no validation folder is given (our
choice: enough normal images to estimate a 1 % tail from a few hundred training images)."""
MIN_VAL_IMAGES = 2


@dataclass
class FolderSet:
    """Records of a plain-folder test or validation set and the bad images that have no mask."""

    records: list[ImageRecord]
    unmasked: list[Path] = field(default_factory=list)


def _image_size_of(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # a bomb: one line, not a traceback
        raise DataError(f"{path}: cannot read image ({exc})") from exc


def match_masks(bad: list[Path], masks_dir: PathLike) -> tuple[dict[Path, Path], list[Path]]:
    """Masks of ``bad`` images by file stem: ``({image: mask}, [images without a mask])``.

    Raises:
        DataError: the mask folder is missing or empty, a mask has no image or shares its stem
            with another mask, or a mask's size differs from its image's.
    """
    masks = list_images(masks_dir, recursive=True)
    by_stem: dict[str, Path] = {}
    for mask in masks:
        if mask.stem in by_stem:
            raise DataError(f"{mask}: two masks for image stem {mask.stem!r} (also {by_stem[mask.stem]})")
        by_stem[mask.stem] = mask
    images = {p.stem: p for p in bad}
    orphans = sorted(set(by_stem) - set(images))
    if orphans:
        raise DataError(f"{by_stem[orphans[0]]}: mask without a bad image of the same stem "
                        f"({len(orphans)} such mask(s) in {masks_dir})")
    matched = {}
    for stem, image in images.items():
        mask = by_stem.get(stem)
        if mask is None:
            continue
        if _image_size_of(mask) != _image_size_of(image):
            (mw, mh), (iw, ih) = _image_size_of(mask), _image_size_of(image)
            raise DataError(f"{mask}: mask is {mw}x{mh} but image {image} is {iw}x{ih} (width x height)")
        matched[image] = mask
    return matched, [p for p in bad if p not in matched]


def folder_records(good: Images | None, bad: Images | None = None, masks: PathLike | None = None) -> FolderSet:
    """Records of good (label 0) and bad (label 1) images; masks matched to bad images by stem."""
    records: list[ImageRecord] = []
    if good is not None:
        records += [ImageRecord(p, 0, source=str(p.parent)) for p in list_images(good, recursive=True)]
    unmasked: list[Path] = []
    if bad is not None:
        bad_paths = list_images(bad, recursive=True)
        matched: dict[Path, Path] = {}
        if masks is not None:
            matched, unmasked = match_masks(bad_paths, masks)
        else:
            unmasked = bad_paths
        records += [ImageRecord(p, 1, mask=matched.get(p), mask_class=1 if p in matched else None,
                                defect_type="bad", source=str(p.parent)) for p in bad_paths]
    elif masks is not None:
        raise DataError(f"{masks}: masks given without bad images")
    return FolderSet(records, unmasked)


def open_folders(good: Images | None, bad: Images | None = None, masks: PathLike | None = None,
                 image_size: ImageSize = 256, name: str = "folders") -> tuple[AnomalyDataset, list[Path]]:
    """An `AnomalyDataset` of plain folders and the bad images without a mask (see `folder_records`)."""
    found = folder_records(good, bad, masks)
    return AnomalyDataset(found.records, image_size=image_size, name=name), found.unmasked


def _resolved(paths: list[Path]) -> set[Path]:
    return {p.resolve() for p in paths}


def check_disjoint(train: list[Path], other: list[Path], what: str) -> None:
    """DataError naming the first image of ``other`` that is also a training image."""
    shared = _resolved(train) & _resolved(other)
    if shared:
        first = sorted(shared)[0]
        raise DataError(f"{first}: image is in both the training set and the {what} set "
                        f"({len(shared)} shared image(s)); give a {what} folder that does not overlap --train")


def split_train_val(train: Images, val_good: Images | None = None, seed: int = 0,
                    fraction: float = VAL_FRACTION) -> tuple[list[Path], list[Path], dict[str, object]]:
    """Training and normal validation images, and a record of how they were chosen.

    With ``val_good`` the two are listed separately and must not share a file; otherwise a seeded
    random ``fraction`` of ``train`` (at least ``MIN_VAL_IMAGES``) is held out.
    """
    train_paths = list_images(train, recursive=True)
    if val_good is not None:
        val_paths = list_images(val_good, recursive=True)
        check_disjoint(train_paths, val_paths, "validation")
        return train_paths, val_paths, {"validation": "given", "n_val_good": len(val_paths)}
    n_val = max(MIN_VAL_IMAGES, int(round(fraction * len(train_paths))))
    if len(train_paths) - n_val < 2:
        raise DataError(f"{train}: {len(train_paths)} image(s) are too few to hold out {n_val} for calibration "
                        "and fit on the rest; add images or give --val-good")
    held = set(np.random.default_rng(seed).permutation(len(train_paths))[:n_val].tolist())
    fit = [p for i, p in enumerate(train_paths) if i not in held]
    val = [p for i, p in enumerate(train_paths) if i in held]
    return fit, val, {"validation": "held out of training folder", "val_fraction": fraction, "val_seed": seed,
                      "n_val_good": len(val)}
