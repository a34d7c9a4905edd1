"""Pre-training: SimSiam, MoCo v2, SimCLR and supervised methods, each optionally with SPD."""

from spotdiff.pretrain.base import LARS, PretrainMethod, Recipe, build_optimizer, spd_loss
from spotdiff.pretrain.methods import METHOD_CLASSES, METHODS, build_method

__all__ = [
    "LARS",
    "METHODS",
    "METHOD_CLASSES",
    "PretrainMethod",
    "Recipe",
    "build_method",
    "build_optimizer",
    "spd_loss",
]
