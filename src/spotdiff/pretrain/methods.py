"""Registry of pre-training methods: ``build_method(name, ...)``."""

from __future__ import annotations

from typing import Any

from spotdiff.errors import ConfigError
from spotdiff.models import WeightsLike, build_backbone, is_random
from spotdiff.pretrain.base import BLEND_HPARAMS, PretrainMethod, zero_init_residual
from spotdiff.pretrain.moco import MoCo
from spotdiff.pretrain.simclr import SimCLR
from spotdiff.pretrain.simsiam import SimSiam
from spotdiff.pretrain.supervised import Supervised

METHOD_CLASSES: dict[str, type[PretrainMethod]] = {cls.name: cls for cls in (SimSiam, MoCo, SimCLR, Supervised)}
METHODS: tuple[str, ...] = tuple(METHOD_CLASSES)


def build_method(
    name: str,
    arch: str = "resnet50",
    spd: bool = False,
    eta: float = 0.1,
    num_classes: int | None = None,
    weights: WeightsLike = None,
    **hparams: Any,
) -> PretrainMethod:
    """A pre-training method around a fresh (or locally loaded) torchvision backbone.

    Args:
        name: one of :data:`METHODS`.
        arch: backbone architecture (see :func:`spotdiff.models.build_backbone`).
        spd: add the SPD loss (weak positive, SmoothBlend negative) with weight ``eta``.
        num_classes: number of classes (``supervised`` only).
        weights: backbone weights to start from (``"imagenet"``, a torchvision weights name, a file,
            see :func:`spotdiff.models.load_weights`); None for random init (seed the RNG first;
            SimSiam then zero-initialises the last BN of every residual block, as its reference).
        hparams: method hyper-parameters (see each class's ``hparam_defaults``) and SmoothBlend's
            ``blend_area``, ``blend_aspect``, ``blend_sigma``, ``blend_jitter``.
    Raises:
        ConfigError: unknown method or hyper-parameter, invalid value.
    """
    if name not in METHOD_CLASSES:
        raise ConfigError(f"unknown pre-training method {name!r}; choose one of {list(METHODS)}")
    cls = METHOD_CLASSES[name]
    allowed = set(cls.hparam_defaults) | set(BLEND_HPARAMS)
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        raise ConfigError(f"{name}: unknown hyper-parameter(s) {unknown}; accepted: {sorted(allowed)}")
    if num_classes is not None and name != "supervised":
        raise ConfigError(f"{name}: num_classes is only used by 'supervised'")
    backbone = build_backbone(arch, weights=weights)
    if is_random(weights) and cls.zero_init_residual:
        zero_init_residual(backbone)
    extra: dict[str, Any] = {"num_classes": num_classes} if name == "supervised" else {}
    return cls(backbone, spd=spd, eta=eta, **extra, **hparams)
