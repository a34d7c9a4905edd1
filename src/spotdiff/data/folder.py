"""`ImageFolderDataset`: unlabelled images (files or folders of files) to score with ``predict``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from spotdiff.data.dataset import ImageSize, as_hw
from spotdiff.data.io import load_image
from spotdiff.data.listing import list_images
from spotdiff.data.transforms import image_to_tensor

PathLike = str | os.PathLike[str]


class ImageFolderDataset(Dataset):
    """Unlabelled images; each item is ``{"image": float32 (3, H, W) in [0, 1], "path": str}``.

    ``image_size``: int or ``(H, W)`` (bilinear resize), None for the native size.
    """

    def __init__(
        self, paths_or_dir: PathLike | Sequence[PathLike], image_size: ImageSize = 256, recursive: bool = False
    ) -> None:
        self.image_size = as_hw(image_size)
        self.paths: list[str] = [str(p) for p in list_images(paths_or_dir, recursive)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        return {"image": image_to_tensor(load_image(path), self.image_size), "path": path}
