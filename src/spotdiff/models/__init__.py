"""Backbones shared by pre-training, 1-class detection and 2-class fine-tuning.

The names below are imported on first use (PEP 562): :mod:`spotdiff.models.arch` (architecture
facts) needs no torch, so a model directory can be validated without importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spotdiff.lazy import lazy_names

if TYPE_CHECKING:
    from spotdiff.models.arch import check_arch, layer_channels
    from spotdiff.models.backbones import (
        ARCHITECTURES,
        LoadedWeights,
        WeightsLike,
        build_backbone,
        describe_weights,
        extract_features,
        file_record,
        inference_backbone,
        is_random,
        is_weights_name,
        load_backbone_weights,
        load_weights,
        random_init_warning,
        read_weights_file,
        torchvision_weights,
        weights_record,
    )

_LAZY = {
    "ARCHITECTURES": "spotdiff.models.backbones",
    "LoadedWeights": "spotdiff.models.backbones",
    "WeightsLike": "spotdiff.models.backbones",
    "build_backbone": "spotdiff.models.backbones",
    "check_arch": "spotdiff.models.arch",
    "describe_weights": "spotdiff.models.backbones",
    "extract_features": "spotdiff.models.backbones",
    "file_record": "spotdiff.models.backbones",
    "inference_backbone": "spotdiff.models.backbones",
    "is_random": "spotdiff.models.backbones",
    "is_weights_name": "spotdiff.models.backbones",
    "layer_channels": "spotdiff.models.arch",
    "load_backbone_weights": "spotdiff.models.backbones",
    "load_weights": "spotdiff.models.backbones",
    "random_init_warning": "spotdiff.models.backbones",
    "read_weights_file": "spotdiff.models.backbones",
    "torchvision_weights": "spotdiff.models.backbones",
    "weights_record": "spotdiff.models.backbones",
}
__all__ = [
    "ARCHITECTURES",
    "LoadedWeights",
    "WeightsLike",
    "build_backbone",
    "check_arch",
    "describe_weights",
    "extract_features",
    "file_record",
    "inference_backbone",
    "is_random",
    "is_weights_name",
    "layer_channels",
    "load_backbone_weights",
    "load_weights",
    "random_init_warning",
    "read_weights_file",
    "torchvision_weights",
    "weights_record",
]


__getattr__ = lazy_names(__name__, _LAZY, globals())
