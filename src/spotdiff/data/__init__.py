"""Datasets (raw VisA read in place, MVTec-AD, prepared VisA, plain folders), split CSVs, k-shot, prepare."""

from spotdiff.data.dataset import AnomalyDataset, ImageRecord
from spotdiff.data.folder import ImageFolderDataset, list_images
from spotdiff.data.layout import detect_layout, open_dataset
from spotdiff.data.magtile import open_magnetic_tile
from spotdiff.data.splits import OFFICIAL_SPLITS, SplitRow, read_split_csv, sample_kshot
from spotdiff.data.visa import load_id2class

__all__ = [
    "OFFICIAL_SPLITS",
    "AnomalyDataset",
    "ImageFolderDataset",
    "ImageRecord",
    "SplitRow",
    "detect_layout",
    "list_images",
    "load_id2class",
    "open_dataset",
    "open_magnetic_tile",
    "read_split_csv",
    "sample_kshot",
]
