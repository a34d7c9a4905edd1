"""The backbone architectures spotdiff builds, as plain facts (torch-free: model directories are
validated with them without importing torch)."""

from __future__ import annotations

from collections.abc import Sequence

from spotdiff.errors import ConfigError, WeightsError

LAYER_CHANNELS: dict[str, dict[str, int]] = {
    "resnet18": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "resnet50": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
    "wide_resnet50_2": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
}
"""Output channels of each residual stage (torchvision's ResNets)."""
ARCHITECTURE_NAMES: tuple[str, ...] = tuple(LAYER_CHANNELS)
LAYER_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
"""Pixels of input per feature-map position of each stage."""


def check_arch(arch: str) -> None:
    """ConfigError unless ``arch`` is one of :data:`ARCHITECTURE_NAMES` (the one check for every caller)."""
    if arch not in ARCHITECTURE_NAMES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURE_NAMES)}")


def layer_channels(arch: str, layers: Sequence[str]) -> list[int]:
    """Channel count of each named residual stage (``layer1`` .. ``layer4``) of ``arch``."""
    check_arch(arch)
    try:
        return [LAYER_CHANNELS[arch][name] for name in layers]
    except KeyError as exc:
        raise WeightsError(f"unknown layer {exc.args[0]!r}; choose from layer1..layer4") from exc
