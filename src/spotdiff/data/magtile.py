"""The magnetic-tile surface-defect dataset (Huang, Qiu, Yuan et al., The Visual Computer 2020).

::

    <root>/MT_Free/Imgs/<name>.jpg          normal image (grayscale crop)
    <root>/MT_Free/Imgs/<name>.png          its mask (empty)
    <root>/MT_<Type>/Imgs/<name>.jpg|.png   defect images and masks, <Type> in
                                            Blowhole, Break, Crack, Fray, Uneven

The dataset has no official split. `split_free_images` draws one from a seed: ``train_fraction``
of the ``MT_Free`` images train, the rest of ``MT_Free`` plus every defect image test.

The masks are 8-bit with anti-aliased edges (every value 0..255 occurs), so a pixel is a defect
pixel when its mask value is >= `MASK_THRESHOLD` (128). An image of a defect folder is anomalous
even when its mask is empty (4 ``Uneven`` images): its pixels then count as normal pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from spotdiff.data.dataset import AnomalyDataset, ImageRecord, ImageSize
from spotdiff.data.splits import SUBSETS
from spotdiff.errors import ConfigError, DataError

OBJECT = "magnetic_tile"
NORMAL_TYPE = "Free"
MASK_THRESHOLD = 128
FOLDER_PREFIX = "MT_"


def is_magnetic_tile_root(path: Path) -> bool:
    """True when ``path`` holds ``MT_Free/Imgs`` (the normal images of the dataset)."""
    return (path / f"{FOLDER_PREFIX}{NORMAL_TYPE}" / "Imgs").is_dir()


def defect_types(root: Path) -> list[str]:
    """Sorted defect type names, from the ``MT_<Type>`` folders other than ``MT_Free``."""
    return sorted(
        p.name[len(FOLDER_PREFIX) :]
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(FOLDER_PREFIX) and p.name != f"{FOLDER_PREFIX}{NORMAL_TYPE}"
    )


def magnetic_tile_class_names(root: Path) -> dict[int, str]:
    """Class id -> defect type (ids follow the sorted type names from 1; 0 = ``BACKGROUND``)."""
    return {0: "BACKGROUND", **{i: name for i, name in enumerate(defect_types(root), start=1)}}


def _image_mask_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` of every ``*.jpg`` in ``folder/Imgs``, sorted; DataError for a missing mask."""
    imgs = folder / "Imgs"
    if not imgs.is_dir():
        raise DataError(f"{imgs}: folder not found")
    pairs = []
    for image in sorted(p for p in imgs.iterdir() if p.suffix.lower() == ".jpg" and not p.name.startswith(".")):
        mask = image.with_suffix(".png")
        if not mask.is_file():
            raise DataError(f"{image}: image has no mask (expected {mask})")
        pairs.append((image, mask))
    if not pairs:
        raise DataError(f"{imgs}: no .jpg images found")
    return pairs


def split_free_images(n_free: int, seed: int = 0, train_fraction: float = 0.8) -> tuple[list[int], list[int]]:
    """Indices (into the sorted ``MT_Free`` images) of the train and test normal images.

    ``round(train_fraction * n_free)`` indices drawn without replacement by
    ``numpy.random.default_rng(seed).permutation`` train; the others test. Both lists are sorted.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"train_fraction must be in (0, 1), got {train_fraction}")
    n_train = int(round(train_fraction * n_free))
    if not 2 <= n_train < n_free:
        raise DataError(f"{n_free} normal images cannot be split with train_fraction={train_fraction}")
    order = np.random.default_rng(seed).permutation(n_free)
    return sorted(order[:n_train].tolist()), sorted(order[n_train:].tolist())


def magnetic_tile_records(root: Path, subset: str, seed: int = 0, train_fraction: float = 0.8) -> list[ImageRecord]:
    """Records of the seeded ``subset`` (``"train"``: normal only; ``"test"``: normal, then defects by type).

    Normal records carry their (empty) mask with class 0, so its size is still checked.

    Raises:
        DataError: ``MT_Free/Imgs`` missing, a folder without images, an image without its mask.
    """
    if subset not in SUBSETS:
        raise DataError(f"unknown subset {subset!r}: expected one of {', '.join(SUBSETS)}")
    if not is_magnetic_tile_root(root):
        raise DataError(f"{root}: not a magnetic-tile root ({root / 'MT_Free' / 'Imgs'} not found)")
    free_dir = root / f"{FOLDER_PREFIX}{NORMAL_TYPE}"
    free = _image_mask_pairs(free_dir)
    train_idx, test_idx = split_free_images(len(free), seed, train_fraction)
    records = [
        ImageRecord(
            image=free[i][0],
            label=0,
            mask=free[i][1],
            mask_class=0,
            defect_type="good",
            source=str(free_dir),
            mask_threshold=MASK_THRESHOLD - 1,
        )
        for i in (train_idx if subset == "train" else test_idx)
    ]
    if subset == "test":
        for class_id, name in list(magnetic_tile_class_names(root).items())[1:]:
            folder = root / f"{FOLDER_PREFIX}{name}"
            records += [
                ImageRecord(
                    image=img,
                    label=1,
                    mask=mask,
                    mask_class=class_id,
                    defect_type=name,
                    source=str(folder),
                    mask_threshold=MASK_THRESHOLD - 1,  # pixel > 127 <=> pixel >= 128
                )
                for img, mask in _image_mask_pairs(folder)
            ]
    return records


def open_magnetic_tile(
    root: str | os.PathLike[str],
    subset: str = "train",
    image_size: ImageSize = 256,
    seed: int = 0,
    train_fraction: float = 0.8,
    skip_bad: bool = False,
) -> AnomalyDataset:
    """Open the seeded train or test subset of a magnetic-tile root (the folder holding ``MT_Free``).

    ``open_dataset(root, "magnetic_tile", subset=..., seed=...)`` calls this when it finds the layout.

    Raises:
        DataError: see `magnetic_tile_records`; ConfigError: ``train_fraction`` outside (0, 1).
    """
    root = Path(root)
    records = magnetic_tile_records(root, subset, seed, train_fraction)
    return AnomalyDataset(
        records,
        image_size=image_size,
        class_names=magnetic_tile_class_names(root),
        skip_bad=skip_bad,
        name=f"magnetic_tile:seed{seed}/{subset}",
    )
