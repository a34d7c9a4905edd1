"""Pre-training data: a folder of images, a deterministic per-sample augmentation seed, a sampler.

Two folder layouts are accepted (both searched recursively for image files):

* class subfolders, ImageFolder-style (``DIR/<class>/**/*.png``): the sorted subfolder names give
  labels 0..C-1 (needed by the ``supervised`` method, ignored by the self-supervised ones);
* any other folder of images (e.g. your own unlabeled normal images): every label is -1.

The folder counts as class subfolders when it holds no image file itself and at least two
subfolders hold images. For a raw VisA or synthetic root, point it at one object's normal
images (``<root>/<object>/Data/Images/Normal``); higher folders also hold anomalies and masks.

Determinism: sample ``index`` of ``epoch`` is augmented under the torch seed
``sample_seed(seed, epoch, index)``, so the views do not depend on the number of data-loading
workers, the number of training processes, or where a run was resumed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from spotdiff.data.io import is_image_file, load_image
from spotdiff.data.listing import list_images
from spotdiff.errors import DataError

ViewTransform = Callable[[Any], dict[str, torch.Tensor]]
UNLABELED = -1


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (``numpy.random.SeedSequence``)."""
    state = np.random.SeedSequence([int(v) % 2**64 for v in values])
    return int(state.generate_state(1, dtype=np.uint64)[0]) >> 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed under which sample ``index`` of ``epoch`` is augmented."""
    return mix_seed(seed, epoch, index, 0x5EED)


def find_images(root: str | os.PathLike[str]) -> tuple[list[Path], list[int], list[str]]:
    """Image paths, labels and class names of a folder (see the module docstring).

    Returns:
        ``(paths, labels, class_names)``; labels are -1 and class_names empty for a plain folder.
    Raises:
        DataError: the folder is missing or holds no image file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    entries = [e for e in sorted(root.iterdir()) if not e.name.startswith(".")]
    if not any(e.is_file() and is_image_file(e) for e in entries):
        found = {e.name: _images_or_none(e) for e in entries if e.is_dir()}  # follows links
        per_class = {name: paths for name, paths in found.items() if paths}
        if len(per_class) >= 2:
            names = sorted(per_class)
            paths = [p for name in names for p in per_class[name]]
            return paths, [i for i, name in enumerate(names) for _ in per_class[name]], names
    paths = list_images(root, recursive=True)
    return paths, [UNLABELED] * len(paths), []


def _images_or_none(folder: Path) -> list[Path] | None:
    try:
        return list_images(folder, recursive=True)
    except DataError:
        return None


def drop_unreadable(paths: list[Path], labels: list[int]) -> tuple[list[Path], list[int], list[str]]:
    """Keep only the images :func:`load_image` can read; also returns why each other one was dropped."""
    good_paths, good_labels, bad = [], [], []
    for path, label in zip(paths, labels, strict=True):
        try:
            load_image(path)
        except DataError as exc:
            bad.append(str(exc))
            continue
        good_paths.append(path)
        good_labels.append(label)
    return good_paths, good_labels, bad


class PretrainImages(Dataset):
    """Images with their label, augmented into views by the method's ``view_transform``.

    Items are looked up by ``(epoch, index)`` keys (see :class:`EpochBatchSampler`) and return
    ``(views, label)``: ``views`` is the transform's dict of ``(3, S, S)`` tensors, ``label`` an
    int (-1 for unlabeled images).
    """

    def __init__(self, paths: list[Path], labels: list[int], transform: ViewTransform, seed: int):
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict[str, torch.Tensor], int]:
        epoch, index = key
        image = load_image(self.paths[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            views = self.transform(image)
        return views, self.labels[index]


class EpochBatchSampler(Sampler[tuple[int, int]]):
    """Shuffled, sharded sample keys ``(epoch, index)`` for one training process.

    Epoch ``e`` uses the permutation seeded by ``(seed, e)``, cut into global batches of
    ``global_batch`` images (the incomplete last batch is dropped). Process ``rank`` of
    ``world_size`` takes the ``rank``-th slice of each global batch, so the global batch of a
    step is the same whatever the number of processes. ``set_epoch(e, start_batch)`` restarts
    mid-epoch without reading the skipped images.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise DataError(f"batch size {global_batch} is not divisible by {world_size} processes")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0xDA7A))
        order = torch.randperm(self.num_samples, generator=g).tolist()
        for b in range(self.start_batch, self.batches_per_epoch):
            first = b * self.global_batch + self.rank * self.local_batch
            for index in order[first : first + self.local_batch]:
                yield self.epoch, index
