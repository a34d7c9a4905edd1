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
    """RGB PIL image -> ``(3, H, W)`` float32 in [0, 1], bilinearly resized (antialiased) to ``size``.

    ``size`` is an int (square) or ``(H, W)``; None keeps the original size. The resize runs on
    the uint8 image (torchvision's fast path) and rounds to whole grey levels before the
    conversion to float: on a 1500 x 1000 JPEG resized to 256 px it takes 2.6 ms against 11.1 ms
    for a float resize, for at most one grey level of difference (``benchmarks/results_detect.md``).
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    t = F.pil_to_tensor(img)
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        t = F.resize(t, list(hw), interpolation=InterpolationMode.BILINEAR, antialias=True)
    return F.to_dtype(t, torch.float32, scale=True)


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
