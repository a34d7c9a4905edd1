"""Tensor conversion shared by every model: resize, to float tensor, ImageNet normalisation.

torchvision is imported on first use, not with the module: importing it imports all of its models
and ``torch._dynamo`` (about 2 s), which ``import spotdiff.data`` need not pay.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_to_tensor(img: Image.Image, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` float32 in [0, 1], bilinearly resized (antialiased) to ``size``
    (an int for a square, or ``(H, W)``; None keeps the original size).

    :func:`spotdiff.data.io.image_to_array` as a tensor: Pillow's resize on the 8-bit image, so
    every path (fit, test, predict with torch, the torch-free onnxruntime predict, serve) decodes
    identically; values are whole grey levels, within one of a float resize (tested).
    """
    from spotdiff.data.io import image_to_array

    hw = None if size is None else ((size, size) if isinstance(size, int) else (int(size[0]), int(size[1])))
    return torch.from_numpy(image_to_array(img, hw))


def mask_to_tensor(mask: np.ndarray, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """``(H, W)`` integer class-id mask -> ``(H', W')`` int64 tensor, nearest-neighbour resized."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    t = torch.from_numpy(np.ascontiguousarray(mask)).to(torch.int64)
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        t = F.resize(t[None], list(hw), interpolation=InterpolationMode.NEAREST_EXACT)[0]
    return t


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of ``(..., 3, H, W)`` tensors in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - mean) / std
