"""`ImageFolderDataset`: unlabelled images (files or folders of files) to score with ``predict``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from spotdiff.data.dataset import ImageSize, as_hw
from spotdiff.data.io import is_image_file, load_image
from spotdiff.data.transforms import image_to_tensor
from spotdiff.errors import DataError

PathLike = str | os.PathLike[str]


def list_images(paths_or_dir: PathLike | Sequence[PathLike], recursive: bool = False) -> list[Path]:
    """Image files named by ``paths_or_dir``: a folder, a file, or a list of either.

    Folders contribute their image files (by extension, hidden files ignored), sorted by path;
    with ``recursive`` their subfolders too. Explicit files keep the given order and must be images.

    Raises:
        DataError: a path is missing or not an image, or no image is found.
    """
    items = [paths_or_dir] if isinstance(paths_or_dir, (str, os.PathLike)) else list(paths_or_dir)
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found.extend(sorted(
                p for p in path.glob(pattern)
                if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ))
        elif path.is_file():
            if not is_image_file(path):
                raise DataError(f"{path}: not an image file (expected one of .jpg .jpeg .png .bmp .tif .tiff .webp)")
            found.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not found:
        names = ", ".join(str(i) for i in items) or "(no paths given)"
        raise DataError(f"no image files found in {names}")
    return found


class ImageFolderDataset(Dataset):
    """Unlabelled images; each item is ``{"image": float32 (3, H, W) in [0, 1], "path": str}``.

    ``image_size``: int or ``(H, W)`` (bilinear resize), None for the native size.
    """

    def __init__(self, paths_or_dir: PathLike | Sequence[PathLike], image_size: ImageSize = 256,
                 recursive: bool = False) -> None:
        self.image_size = as_hw(image_size)
        self.paths: list[str] = [str(p) for p in list_images(paths_or_dir, recursive)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        return {"image": image_to_tensor(load_image(path), self.image_size), "path": path}
