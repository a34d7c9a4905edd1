"""Plain folders: good images, bad images (one defect type per subfolder) and their masks.

This is the layout of a production line: no split CSVs, no object names. Every role (good, bad,
masks, training, validation) takes one or several folders (or image files), searched recursively,
symbolic links followed (a link loop is refused).

* **Defect types.** Each immediate subfolder of a bad folder is a defect type (``bad/scratch/``,
  ``bad/dent/``); images directly inside a bad folder take that folder's own name as their type. A
  defect-type folder without images, or one named ``good``, is refused.
* **Masks** are matched to bad images by stem (see `spotdiff.data.masks`), may mirror the image
  tree, must have the image's size and be binary (or a ``mask_threshold`` is given). Bad images
  without a mask are allowed (image-level metrics only use them; their pixels count as normal in
  pixel metrics) and listed in ``FolderSet.unmasked``.
* **Overlaps** are checked by content: an image (the same file, a hard link or a byte-identical
  copy) may not be both good and bad, or both a training and a validation image.

Everything is checked before anything is fitted or written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spotdiff.data.dataset import AnomalyDataset, ImageRecord, ImageSize, default_workers
from spotdiff.data.io import image_size
from spotdiff.data.listing import check_unique, list_images
from spotdiff.data.masks import TreeFile, check_binary, match_masks, tree_files
from spotdiff.errors import DataError
from spotdiff.files import sha256_file

PathLike = str | os.PathLike[str]
Images = PathLike | Sequence[PathLike]

VAL_FRACTION = 0.2
"""Share of the training images held out for calibration when no validation folder is given (our
choice: enough normal images to estimate a 1 % tail from a few hundred training images)."""
MIN_VAL_IMAGES = 2


@dataclass
class FolderSet:
    """Records of a plain-folder test or validation set, the bad images that have no mask, and a
    line saying how masks were matched (empty without masks)."""

    records: list[ImageRecord]
    unmasked: list[Path] = field(default_factory=list)
    mask_note: str = ""


def _items(images: Images) -> list[Path]:
    return [Path(images)] if isinstance(images, (str, os.PathLike)) else [Path(i) for i in images]


def defect_type_of(image: TreeFile) -> str:
    """The defect type of a bad image: its immediate subfolder of the given bad folder, else that folder's name."""
    return image.chain[1] if len(image.chain) > 1 else image.chain[0]


def bad_images(bad: Images) -> list[TreeFile]:
    """Bad image files with their folder chains (see `defect_type_of`).

    Raises:
        DataError: no images; a defect-type folder (immediate subfolder of a bad folder) holds no
            image; a defect type is named ``good``.
    """
    found = tree_files(bad)
    check_unique([f.path for f in found])
    types = {defect_type_of(f) for f in found}
    for root in _items(bad):
        if not root.is_dir():
            continue
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if not entry.name.startswith(".") and entry.is_dir() and entry.name not in types:
                raise DataError(
                    f"{entry.path}: defect-type folder holds no images (each subfolder of a bad "
                    "folder is a defect type); remove it or add its images"
                )
    for f in found:
        if defect_type_of(f) == "good":
            raise DataError(
                f"{f.path}: a bad image in a folder named 'good' (defect type 'good'); give good "
                "images with --good, not inside a bad folder"
            )
    return found


def folder_records(
    good: Images | None,
    bad: Images | None = None,
    masks: Images | None = None,
    mask_suffix: str | None = None,
    mask_threshold: float | None = None,
    what: str = "test",
) -> FolderSet:
    """Records of good (label 0) and bad (label 1, defect type per subfolder) images, masks matched.

    ``what`` names the set in errors (``test``, ``validation``). Good and bad images may not share
    content (`check_no_overlap`).
    """
    records: list[ImageRecord] = []
    good_paths = list_images(good, recursive=True) if good is not None else []
    records += [ImageRecord(p, 0, source=str(p.parent)) for p in good_paths]
    if bad is None:
        if masks is not None:
            raise DataError(f"{_label(masks)}: masks given without bad images")
        check_image_headers(good_paths)
        return FolderSet(records)
    found = bad_images(bad)
    bad_paths = [f.path for f in found]
    if good_paths:
        hashes = content_hashes([*good_paths, *bad_paths], check_headers=True)
        check_no_overlap(good_paths, bad_paths, f"good {what}", f"bad {what}", hashes)
    else:
        check_image_headers(bad_paths)
    matched: dict[Path, Path] = {}
    unmasked, note = bad_paths, ""
    threshold = 0
    if masks is not None:
        match = match_masks(found, masks, mask_suffix)
        matched, unmasked, note = match.matched, match.unmasked, match.describe()
        check_binary(list(matched.values()), mask_threshold, default_workers())
        threshold = int(np.floor(mask_threshold)) if mask_threshold is not None else 0
    elif mask_suffix is not None or mask_threshold is not None:
        raise DataError("--mask-suffix and --mask-threshold need a mask folder")
    records += [
        ImageRecord(
            f.path,
            1,
            mask=matched.get(f.path),
            mask_class=1 if f.path in matched else None,
            mask_threshold=threshold,
            defect_type=defect_type_of(f),
            source=str(f.path.parent),
        )
        for f in found
    ]
    return FolderSet(records, unmasked, note)


def _label(images: Images) -> str:
    return ", ".join(str(p) for p in _items(images))


def open_folders(
    good: Images | None,
    bad: Images | None = None,
    masks: Images | None = None,
    image_size: ImageSize = 256,
    name: str = "folders",
    mask_suffix: str | None = None,
    mask_threshold: float | None = None,
) -> tuple[AnomalyDataset, FolderSet]:
    """An `AnomalyDataset` of plain folders and its `FolderSet` (unmasked bad images, mask note)."""
    found = folder_records(good, bad, masks, mask_suffix, mask_threshold, what=name)
    return AnomalyDataset(found.records, image_size=image_size, name=name), found


# ----------------------------------------------------------------------------- overlaps by content


def content_hashes(
    paths: Sequence[Path], workers: int | None = None, check_headers: bool = False
) -> dict[Path, str | None]:
    """SHA-256 of each file's bytes (None for a file that cannot be read: reading it reports it later).

    ``check_headers``: also read each image header (`check_image_headers`).
    """

    def digest(path: Path) -> str | None:
        if check_headers:
            image_size(path)
        try:
            return sha256_file(path)
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        return dict(zip(paths, pool.map(digest, paths), strict=True))


def check_image_headers(paths: Sequence[Path], workers: int | None = None) -> None:
    """Read every image header (`spotdiff.data.io.image_size`), so that a broken link, an unreadable
    header or a decompression bomb is refused now, in one line, before a long fit or test."""
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        list(pool.map(image_size, paths))


def _same_file(a: Path, b: Path) -> str:
    """How ``b`` relates to ``a``, whose contents are equal: the same file, a hard link or a copy."""
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return "is a byte-identical copy of"
    if os.path.realpath(a) == os.path.realpath(b):
        return "is the same file as"
    return "is a hard link of" if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) else "is a byte-identical copy of"


def check_no_overlap(
    first: Sequence[Path],
    second: Sequence[Path],
    first_name: str,
    second_name: str,
    hashes: dict[Path, str | None] | None = None,
) -> None:
    """DataError naming a file of ``second`` and a file of ``first`` with the same content (the same
    file, a hard link or a byte-identical copy), with the count of such files.

    ``hashes``: already computed `content_hashes` (missing files are hashed here).
    """
    known = dict(hashes or {})
    todo = [p for p in (*first, *second) if p not in known]
    known.update(content_hashes(todo))
    by_hash: dict[str, Path] = {}
    for p in first:
        h = known[p]
        if h is not None:
            by_hash.setdefault(h, p)
    shared = [(p, by_hash[h]) for p in second if (h := known[p]) is not None and h in by_hash]
    if shared:
        b, a = shared[0]
        raise DataError(
            f"{b} {_same_file(a, b)} {a}: an image may not be in both the {first_name} set and the "
            f"{second_name} set ({len(shared)} such file(s))"
        )


# ----------------------------------------------------------------------------- held-out validation share


def holdout(
    paths: Sequence[Path],
    fraction: float = VAL_FRACTION,
    seed: int = 0,
    hashes: dict[Path, str | None] | None = None,
    where: str = "training images",
) -> tuple[list[int], list[int]]:
    """Indices ``(fit, validation)``: a seeded random ``fraction`` (at least ``MIN_VAL_IMAGES``) held out.

    The draw is ``numpy.random.default_rng(seed).permutation``; byte-identical files (``hashes``)
    always land on the same side, so a held-out image is never a copy of a fitted one.

    Raises:
        DataError: ``fraction`` outside (0, 1), or too few images to hold out and still fit on 2.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {fraction}")
    n = len(paths)
    n_val = max(MIN_VAL_IMAGES, round(fraction * n))
    if n - n_val < 2:
        raise DataError(
            f"{where}: {n} image(s) are too few to hold out {n_val} for calibration and fit on "
            "the rest; add images or give --val-good"
        )
    groups: dict[object, list[int]] = {}
    for i, p in enumerate(paths):
        h = hashes.get(p) if hashes else None
        groups.setdefault(h if h is not None else ("path", i), []).append(i)
    key_of = {i: k for k, members in groups.items() for i in members}
    held: set[int] = set()
    for i in np.random.default_rng(seed).permutation(n).tolist():
        if len(held) >= n_val:
            break
        if i not in held:
            held.update(groups[key_of[i]])
    if n - len(held) < 2:
        raise DataError(
            f"{where}: after holding out {len(held)} image(s) (byte-identical copies stay together), "
            "fewer than 2 are left to fit on; give --val-good"
        )
    return [i for i in range(n) if i not in held], sorted(held)


def split_train_val(
    train: Images, val_good: Images | None = None, seed: int = 0, fraction: float = VAL_FRACTION
) -> tuple[list[Path], list[Path], dict[str, object]]:
    """Training and normal validation images, and a record of how they were chosen.

    With ``val_good`` the two are listed separately and may not share content; otherwise a seeded
    `holdout` of ``fraction`` of ``train`` is used.
    """
    train_paths = list_images(train, recursive=True)
    if val_good is not None:
        val_paths = list_images(val_good, recursive=True)
        check_no_overlap(train_paths, val_paths, "training", "normal validation")
        return train_paths, val_paths, {"validation": "given", "n_val_good": len(val_paths)}
    hashes = content_hashes(train_paths)
    fit_idx, val_idx = holdout(train_paths, fraction, seed, hashes, where=_label(train))
    return (
        [train_paths[i] for i in fit_idx],
        [train_paths[i] for i in val_idx],
        {
            "validation": "held out of training folder",
            "val_fraction": fraction,
            "val_seed": seed,
            "n_val_good": len(val_idx),
        },
    )
