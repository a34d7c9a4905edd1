"""Pre-training: SimSiam, MoCo v2, SimCLR and supervised methods, each optionally with SPD."""

from spotdiff.pretrain.base import PretrainMethod, Recipe, spd_loss
from spotdiff.pretrain.methods import METHOD_CLASSES, METHODS, build_method

__all__ = ["METHODS", "METHOD_CLASSES", "PretrainMethod", "Recipe", "build_method", "spd_loss"]
