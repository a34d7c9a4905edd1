"""Backbones shared by pre-training, 1-class detection and 2-class fine-tuning."""

from spotdiff.models.backbones import (
    ARCHITECTURES,
    build_backbone,
    extract_features,
    inference_backbone,
    layer_channels,
    load_backbone_weights,
    read_weights_file,
)

__all__ = [
    "ARCHITECTURES",
    "build_backbone",
    "extract_features",
    "inference_backbone",
    "layer_channels",
    "load_backbone_weights",
    "read_weights_file",
]
