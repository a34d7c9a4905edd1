"""Masks of plain-folder bad images: matched by file stem, checked for size and for being binary.

A mask is matched to a bad image when its stem is the image's stem plus a suffix: ``--mask-suffix``
when given, else both ``_mask`` (MVTec-AD's ``000_mask.png``) and the plain stem (``000.png``), and
`MaskMatch.suffixes` says which matched. Equal stems in different defect types are told apart by the
folders: the mask whose folder names, read upwards from the file, agree longest with the image's
(``masks/crack/000.png`` for ``bad/crack/000.png``) wins; a tie is refused, never guessed.

A mask must be binary: one image of its image's size holding 0 (normal) and at most one other value
(the defect value, e.g. 1 or 255). Anything else (JPEG artefacts, anti-aliased edges, class ids) is
refused unless a ``mask_threshold`` T is given: defect pixels are then those with value > T.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spotdiff.data.io import image_size, load_mask
from spotdiff.data.listing import list_images
from spotdiff.errors import DataError

PathLike = str | os.PathLike[str]
AUTO_SUFFIXES = ("_mask", "")
"""Suffixes tried when no ``mask_suffix`` is given: MVTec-AD's ``<stem>_mask`` and the plain stem."""


@dataclass(frozen=True)
class TreeFile:
    """An image or mask file and the folder names from its given folder down to it (``chain``)."""

    path: Path
    chain: tuple[str, ...]


def tree_files(folders: PathLike | Sequence[PathLike]) -> list[TreeFile]:
    """Image files under ``folders`` (recursive, see `list_images`) with their folder chains."""
    items = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    found: list[TreeFile] = []
    for item in items:
        root = Path(item)
        for path in list_images(root, recursive=True):
            rel = path.relative_to(root).parent.parts if root.is_dir() else ()
            base = Path(os.path.abspath(root if root.is_dir() else root.parent)).name
            found.append(TreeFile(path, (base, *rel)))
    return found


def _agreement(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """How many folder names agree, read upwards from the files."""
    n = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class MaskMatch:
    """``matched``: image -> mask; ``unmasked``: bad images without a mask; ``suffixes``: how many
    masks matched with each suffix (``"_mask"``, ``""``, or the given one)."""

    matched: dict[Path, Path]
    unmasked: list[Path]
    suffixes: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: which naming matched, e.g. ``masks matched as <stem>_mask.* for 63 of 63 bad images``."""
        total = len(self.matched) + len(self.unmasked)
        parts = [f"<stem>{s}.* for {n}" for s, n in self.suffixes.items() if n]
        return f"masks matched as {' and '.join(parts) or 'nothing'} of {total} bad image(s)"


def match_masks(
    bad: Sequence[TreeFile], masks: PathLike | Sequence[PathLike], mask_suffix: str | None = None
) -> MaskMatch:
    """Masks of ``bad`` images by stem (see the module docstring), sizes checked.

    Raises:
        DataError: a mask folder is missing or empty; no mask matches any image (naming the
            suffixes tried); an image matches two masks, or a mask two images, equally well; a mask
            matches no image; a mask's size differs from its image's.
    """
    mask_files = tree_files(masks)
    suffixes = AUTO_SUFFIXES if mask_suffix is None else (mask_suffix,)
    by_stem: dict[str, list[TreeFile]] = {}
    for m in mask_files:
        by_stem.setdefault(m.path.stem, []).append(m)
    # every image's best masks
    choice: dict[Path, tuple[TreeFile, str, int]] = {}
    for image in bad:
        candidates = [
            (m, s, _agreement(image.chain, m.chain)) for s in suffixes for m in by_stem.get(image.path.stem + s, [])
        ]
        if not candidates:
            continue
        top = max(c[2] for c in candidates)
        best = [c for c in candidates if c[2] == top]
        if len(best) > 1:
            raise DataError(
                f"{image.path}: {len(best)} masks match it equally ({best[0][0].path}, {best[1][0].path}); "
                "keep one, or mirror the image folders in the mask folder (masks/<type>/<stem>.png)"
            )
        choice[image.path] = best[0]
    if not choice:
        tried = " or ".join(f"<stem>{s}" for s in suffixes)
        example = mask_files[0].path.name
        hint = "give --mask-suffix" if mask_suffix is None else f"--mask-suffix {mask_suffix!r} matches no mask"
        raise DataError(
            f"{masks_label(masks)}: no mask is named {tried} after a bad image (masks are named like {example}); {hint}"
        )
    # every mask's image: the best-agreeing one; a tie is refused
    claims: dict[Path, list[tuple[Path, int]]] = {}
    for image_path, (m, _, score) in choice.items():
        claims.setdefault(m.path, []).append((image_path, score))
    matched: dict[Path, Path] = {}
    counts = dict.fromkeys(suffixes, 0)
    for mask_path, images in claims.items():
        top = max(score for _, score in images)
        winners = [p for p, score in images if score == top]
        if len(winners) > 1:
            raise DataError(
                f"{mask_path}: mask matches {len(winners)} bad images ({winners[0]}, {winners[1]}); "
                "mirror the image folders in the mask folder (masks/<type>/<stem>.png) or rename one"
            )
        matched[winners[0]] = mask_path
        counts[choice[winners[0]][1]] += 1
    orphans = [m.path for m in mask_files if m.path not in claims]
    if orphans:
        raise DataError(
            f"{orphans[0]}: mask without a bad image of the same stem ({len(orphans)} such mask(s); "
            f"names tried: {', '.join(repr(s) for s in suffixes)} after the image stem)"
        )
    for image_path, mask_path in matched.items():
        mask_wh, image_wh = image_size(mask_path), image_size(image_path)
        if mask_wh != image_wh:
            raise DataError(
                f"{mask_path}: mask is {mask_wh[0]}x{mask_wh[1]} but image {image_path} is "
                f"{image_wh[0]}x{image_wh[1]} (width x height)"
            )
    return MaskMatch(matched, [b.path for b in bad if b.path not in matched], counts)


def masks_label(masks: PathLike | Sequence[PathLike]) -> str:
    items = [masks] if isinstance(masks, (str, os.PathLike)) else list(masks)
    return ", ".join(str(m) for m in items)


def check_binary(mask_paths: Sequence[Path], mask_threshold: float | None = None, workers: int = 4) -> None:
    """DataError naming the first mask that is not binary (0 and at most one other value), unless
    ``mask_threshold`` is given; a threshold outside [0, 255) is refused (it would make every mask empty or full)."""
    if mask_threshold is not None:
        if not (np.isfinite(mask_threshold) and 0 <= mask_threshold < 255):
            raise DataError(f"--mask-threshold must be in [0, 255), got {mask_threshold}")
        return

    def values(path: Path) -> np.ndarray:
        return np.unique(load_mask(path))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, found in zip(mask_paths, pool.map(values, mask_paths), strict=True):
            if found[found != 0].size > 1:
                shown = ", ".join(str(int(v)) for v in found[:6]) + (", ..." if found.size > 6 else "")
                raise DataError(
                    f"{path}: mask is not binary ({found.size} values: {shown}); a mask holds 0 for "
                    "normal pixels and one defect value (e.g. 255); give --mask-threshold T to count "
                    "values > T as defect (--mask-threshold 0 for multi-class masks such as VisA's, "
                    "whose values are defect-class ids)"
                )
