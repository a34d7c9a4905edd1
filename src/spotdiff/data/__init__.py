"""Datasets (raw VisA read in place, MVTec-AD, prepared VisA, plain folders), split CSVs, k-shot, prepare.

The names below are imported on first use (PEP 562), so that the torch-free modules of this package
(``io``, ``listing``, ``loader``) can be used without importing torch (``predict --backend onnxruntime``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spotdiff.lazy import lazy_names

if TYPE_CHECKING:
    from spotdiff.data.dataset import AnomalyDataset, ImageRecord
    from spotdiff.data.folder import ImageFolderDataset
    from spotdiff.data.layout import detect_layout, open_dataset
    from spotdiff.data.listing import list_images
    from spotdiff.data.magtile import open_magnetic_tile
    from spotdiff.data.splits import OFFICIAL_SPLITS, SplitRow, read_split_csv, sample_kshot
    from spotdiff.data.visa import load_id2class

_LAZY = {
    "OFFICIAL_SPLITS": "spotdiff.data.splits",
    "AnomalyDataset": "spotdiff.data.dataset",
    "ImageFolderDataset": "spotdiff.data.folder",
    "ImageRecord": "spotdiff.data.dataset",
    "SplitRow": "spotdiff.data.splits",
    "detect_layout": "spotdiff.data.layout",
    "list_images": "spotdiff.data.listing",
    "load_id2class": "spotdiff.data.visa",
    "open_dataset": "spotdiff.data.layout",
    "open_magnetic_tile": "spotdiff.data.magtile",
    "read_split_csv": "spotdiff.data.splits",
    "sample_kshot": "spotdiff.data.splits",
}
__all__ = [
    "AnomalyDataset",
    "ImageFolderDataset",
    "ImageRecord",
    "OFFICIAL_SPLITS",
    "SplitRow",
    "detect_layout",
    "list_images",
    "load_id2class",
    "open_dataset",
    "open_magnetic_tile",
    "read_split_csv",
    "sample_kshot",
]


__getattr__ = lazy_names(__name__, _LAZY, globals())
