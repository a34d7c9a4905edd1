"""Per-sample view pipelines for pre-training (run on CPU in DataLoader workers, global torch RNG).

Every pipeline maps a PIL image (or a ``(3, H, W)`` tensor) to a ``(3, size, size)`` float32 tensor
in [0, 1]; :class:`MultiViewTransform` runs several of them and normalises with ImageNet mean/std.

* :func:`weak_augmentation`: the SPD "weak global augmentation" -- a mild random resized crop
  (scale 0.8-1, ratio 0.9-1.1), a small colour jitter (0.1, 0.1, 0.1, 0.02), a light Gaussian blur
  (sigma 0.1-1, p = 0.5) and a horizontal flip. Much weaker than SSL views, so that the positive
  stays globally close to the image while SmoothBlend's local change is what distinguishes the
  negative.
* :func:`ssl_augmentation`: the strong views of SimSiam / MoCo v2 (``crop_scale=(0.2, 1)``, jitter
  (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, blur sigma 0.1-2 with p = 0.5, flip) and of
  SimCLR (``crop_scale=(0.08, 1)``, jitter strength 1: (0.8, 0.8, 0.8, 0.2)).
* :func:`supervised_augmentation`: the ImageNet classification recipe (random resized crop
  0.08-1, flip).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from spotdiff.data.transforms import normalize

ImageLike = Image.Image | torch.Tensor
ViewFn = Callable[[ImageLike], torch.Tensor]


def _blur_kernel(size: int) -> int:
    """Odd Gaussian-blur kernel of about 10 % of the image side (SimCLR's choice), at least 3."""
    k = max(3, int(round(0.1 * size)))
    return k if k % 2 else k + 1


def _to_float() -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def weak_augmentation(
    size: int,
    crop_scale: Sequence[float] = (0.8, 1.0),
    crop_ratio: Sequence[float] = (0.9, 1.1),
    jitter: Sequence[float] = (0.1, 0.1, 0.1, 0.02),
    blur_sigma: Sequence[float] = (0.1, 1.0),
    blur_p: float = 0.5,
    flip_p: float = 0.5,
) -> v2.Compose:
    """The weak global augmentation of SPD: image -> ``(3, size, size)`` float32 in [0, 1]."""
    b, c, s, h = jitter
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=tuple(crop_scale), ratio=tuple(crop_ratio), antialias=True),
            v2.RandomHorizontalFlip(flip_p),
            v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h),
            v2.RandomApply([v2.GaussianBlur(_blur_kernel(size), sigma=tuple(blur_sigma))], p=blur_p),
            *_to_float(),
        ]
    )


def ssl_augmentation(
    size: int,
    crop_scale: Sequence[float] = (0.2, 1.0),
    jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_sigma: Sequence[float] = (0.1, 2.0),
    blur_p: float = 0.5,
) -> v2.Compose:
    """A strong SSL view (defaults: SimSiam / MoCo v2): image -> ``(3, size, size)`` float32 in [0, 1]."""
    b, c, s, h = jitter
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True),
            v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=jitter_p),
            v2.RandomGrayscale(grayscale_p),
            v2.RandomApply([v2.GaussianBlur(_blur_kernel(size), sigma=tuple(blur_sigma))], p=blur_p),
            v2.RandomHorizontalFlip(),
            *_to_float(),
        ]
    )


def supervised_augmentation(size: int) -> v2.Compose:
    """ImageNet classification training view: random resized crop (0.08-1) + flip."""
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *_to_float()])


class MultiViewTransform:
    """Run several view pipelines on one image: ``image -> {name: (3, S, S) normalised float32}``.

    Pipelines run in the order given, drawing from the global torch RNG (seeded per DataLoader
    worker), and must return tensors in [0, 1]; ImageNet normalisation is applied here.
    """

    def __init__(self, views: Mapping[str, ViewFn]) -> None:
        if not views:
            raise ValueError("MultiViewTransform needs at least one view")
        self.views = dict(views)

    def __call__(self, image: ImageLike) -> dict[str, torch.Tensor]:
        return {name: normalize(fn(image).as_subclass(torch.Tensor)) for name, fn in self.views.items()}

    def __repr__(self) -> str:
        inner = ",\n".join(f"  {name}: {fn!r}" for name, fn in self.views.items())
        return f"MultiViewTransform(\n{inner}\n)"
