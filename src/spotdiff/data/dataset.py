"""`AnomalyDataset`: a list of (image, label, mask) records read lazily, whatever the on-disk layout.

Layout readers (`spotdiff.data.visa`, `spotdiff.data.mvtec`) turn a dataset root into
`ImageRecord`s; this module decodes them. Construction only ``stat``s files; images and masks
are decoded in ``__getitem__`` (or once each at construction with ``skip_bad=True``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from spotdiff.data.io import load_image, load_mask
from spotdiff.data.transforms import image_to_tensor, mask_to_tensor
from spotdiff.errors import ConfigError, DataError
from spotdiff.progress import progress

log = logging.getLogger(__name__)

ImageSize = int | tuple[int, int] | None


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset.

    ``mask_class``: None when the mask file stores class ids (raw VisA); otherwise every mask pixel
    above ``mask_threshold`` (default 0: every nonzero pixel) gets this id (MVTec-AD defect folder,
    binarised prepared masks, plain folders).
    ``defect_type``: None means "derive from the class ids in the mask" (raw VisA).
    ``source``: where the record came from (CSV row or folder), for error messages.
    """

    image: Path
    label: int
    mask: Path | None = None
    mask_class: int | None = None
    defect_type: str | None = None
    source: str = ""
    mask_threshold: int = 0


def default_workers() -> int:
    """Thread count for file checks and copies: min(8, CPU count)."""
    return max(1, min(8, os.cpu_count() or 1))


def as_hw(size: ImageSize) -> tuple[int, int] | None:
    """``image_size`` argument -> ``(H, W)`` or None; ConfigError when not positive."""
    if size is None:
        return None
    if isinstance(size, int):
        if size < 1:
            raise ConfigError(f"image_size must be positive, got {size}")
        return (size, size)
    hw = tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < 1:
        raise ConfigError(f"image_size must be an int or (H, W) of positive ints, got {size!r}")
    return hw[0], hw[1]


def check_record(record: ImageRecord) -> None:
    """Decode the image and mask of ``record`` and check their sizes match; DataError otherwise."""
    img = load_image(record.image)
    if record.mask is not None:
        mask = load_mask(record.mask)
        _check_mask_size(record, img.size, mask.shape)


def _check_mask_size(record: ImageRecord, image_wh: tuple[int, int], mask_hw: tuple[int, ...]) -> None:
    w, h = image_wh
    if tuple(mask_hw) != (h, w):
        raise DataError(
            f"mask {record.mask} is {mask_hw[1]}x{mask_hw[0]} but image {record.image} is {w}x{h} (width x height)"
        )


class AnomalyDataset(Dataset):
    """Images with image labels, pixel masks and defect classes.

    Each item is a dict:

    - ``image``: float32 ``(3, H, W)`` in [0, 1] (not normalised; see `transforms.normalize`)
    - ``label``: int, 0 normal / 1 anomalous
    - ``mask``: float32 ``(H, W)`` in {0, 1} (all zero for a normal image)
    - ``class_mask``: int64 ``(H, W)`` defect-class ids (0 = background), see ``class_names``
    - ``defect_type``: str, ``"good"`` for a normal image
    - ``path``: str, the image file

    ``H, W`` is ``image_size`` (bilinear for images, nearest for masks) or the native size when
    ``image_size`` is None.

    Attributes:
        labels: image labels in item order.
        paths: image paths (str) in item order.
        class_names: defect-class id -> name (0 is the background).
        skipped: ``(path, reason)`` of every image dropped by ``skip_bad``.
        name: a short description (layout, object, split, subset).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: ImageSize = 256,
        class_names: Mapping[int, str] | None = None,
        skip_bad: bool = False,
        name: str = "",
        workers: int | None = None,
    ) -> None:
        self.image_size = as_hw(image_size)
        self.class_names: dict[int, str] = dict(class_names or {0: "BACKGROUND"})
        self.name = name
        self.skipped: list[tuple[str, str]] = []
        records = list(records)
        if skip_bad:
            records = self._drop_bad(records, workers or default_workers())
        else:
            for s in records:  # stat only: decoding errors surface in __getitem__
                for f in (s.image, s.mask):
                    if f is not None and not f.is_file():
                        where = f" ({s.source})" if s.source else ""
                        raise DataError(f"{f}: file not found{where}")
        self.records: list[ImageRecord] = records
        self.labels: list[int] = [s.label for s in records]
        self.paths: list[str] = [str(s.image) for s in records]

    def _drop_bad(self, records: list[ImageRecord], workers: int) -> list[ImageRecord]:
        """Decode every image and mask once (the cost of ``skip_bad``) and drop failures."""

        def reason(s: ImageRecord) -> str | None:
            try:
                check_record(s)
            except DataError as exc:
                return str(exc)
            return None

        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(
                progress(pool.map(reason, records), desc=f"checking {self.name or 'images'}", total=len(records))
            )
        kept = []
        for s, why in zip(records, reasons):
            if why is None:
                kept.append(s)
            else:
                self.skipped.append((str(s.image), why))
        if self.skipped:
            log.info(
                f"{self.name or 'dataset'}: skipped {len(self.skipped)} of {len(records)} image(s) that failed to load"
            )
        return kept

    def __len__(self) -> int:
        return len(self.records)

    def class_name(self, class_id: int) -> str:
        """Name of a defect-class id; ``class_<id>`` when unknown."""
        return self.class_names.get(int(class_id), f"class_{int(class_id)}")

    def subset(self, indices: Sequence[int]) -> AnomalyDataset:
        """A new dataset with the items at ``indices`` (e.g. from `sample_kshot`), same settings."""
        new = AnomalyDataset(
            [self.records[i] for i in indices], image_size=self.image_size, class_names=self.class_names, name=self.name
        )
        new.skipped = list(self.skipped)
        return new

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.records[index]
        img = load_image(s.image)
        image = image_to_tensor(img, self.image_size)
        h, w = image.shape[-2:]
        if s.mask is not None:
            raw = load_mask(s.mask)
            _check_mask_size(s, img.size, raw.shape)
            if s.mask_class is not None:
                raw = np.where(raw > s.mask_threshold, s.mask_class, 0).astype(np.uint8)
            elif not raw.flags.writeable:  # torch.from_numpy warns on read-only arrays
                raw = raw.copy()
            class_mask = mask_to_tensor(raw, self.image_size)
        else:
            raw = None
            class_mask = torch.zeros((h, w), dtype=torch.int64)
        if s.label == 0:
            defect_type = "good"
        elif s.defect_type is not None:
            defect_type = s.defect_type
        else:
            ids = sorted(int(i) for i in np.unique(raw) if i != 0) if raw is not None else []
            defect_type = "+".join(self.class_name(i) for i in ids) or "anomaly"
        return {
            "image": image,
            "label": s.label,
            "mask": (class_mask > 0).to(torch.float32),
            "class_mask": class_mask,
            "defect_type": defect_type,
            "path": str(s.image),
        }

    def __repr__(self) -> str:
        n_anom = sum(self.labels)
        return (
            f"AnomalyDataset({self.name!r}, {len(self)} images: {len(self) - n_anom} normal, "
            f"{n_anom} anomalous, image_size={self.image_size})"
        )
