"""Tiny in-memory images for the detector tests (PaDiM, PatchCore)."""

from __future__ import annotations

import torch


def tiny_padim_args(size: int = 32) -> list[str]:
    """`spotdiff fit` options of a tiny PaDiM (resnet18, random init, d = 8, layer1, ``size`` px): add
    the images and ``--out``."""
    model = ["--model", "padim", "--arch", "resnet18", "--weights", "random", "--d", "8", "--layers", "layer1"]
    return [*model, "--image-size", str(size)]


def square_images(n: int, size: int = 64, defect: bool = False, seed: int = 0) -> torch.Tensor:
    """``(n, 3, size, size)`` grey noisy images in [0, 1]; defective ones carry a red 12 px square
    at a seed-dependent place."""
    g = torch.Generator().manual_seed(seed)
    images = (0.45 + 0.04 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    if defect:
        for i in range(n):
            y, x = torch.randint(4, size - 16, (2,), generator=g).tolist()
            images[i, :, y : y + 12, x : x + 12] = torch.tensor([0.95, 0.1, 0.1])[:, None, None]
    return images


def as_dataset(images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The images as a list of dataset items ``{"image": (3, H, W)}``."""
    return [{"image": img} for img in images]
