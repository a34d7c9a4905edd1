"""Augmentations for SPD pre-training: SmoothBlend (batched and single-image) and view pipelines."""

from spotdiff.augment.smoothblend import BlendParams, SmoothBlend, SmoothBlendTransform, color_jitter_batch
from spotdiff.augment.views import MultiViewTransform, ssl_augmentation, supervised_augmentation, weak_augmentation

__all__ = [
    "BlendParams",
    "MultiViewTransform",
    "SmoothBlend",
    "SmoothBlendTransform",
    "color_jitter_batch",
    "ssl_augmentation",
    "supervised_augmentation",
    "weak_augmentation",
]
