"""Backbones shared by pre-training, 1-class detection and 2-class fine-tuning."""

from spotdiff.models.backbones import (
    ARCHITECTURES,
    LoadedWeights,
    WeightsLike,
    build_backbone,
    describe_weights,
    file_record,
    extract_features,
    inference_backbone,
    is_random,
    is_weights_name,
    layer_channels,
    load_backbone_weights,
    load_weights,
    random_init_warning,
    read_weights_file,
    weights_record,
)

__all__ = [
    "ARCHITECTURES",
    "LoadedWeights",
    "WeightsLike",
    "build_backbone",
    "describe_weights",
    "file_record",
    "extract_features",
    "inference_backbone",
    "is_random",
    "is_weights_name",
    "layer_channels",
    "load_backbone_weights",
    "load_weights",
    "random_init_warning",
    "read_weights_file",
    "weights_record",
]
