"""Supervised pre-training on class labels, with SPD as an auxiliary "spot the blend" classifier."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet

from spotdiff.augment.views import ViewFn, supervised_augmentation
from spotdiff.errors import ConfigError
from spotdiff.pretrain.base import PretrainMethod, Recipe


class Supervised(PretrainMethod):
    """``L_base = CE(classifier(f(x)), y)``.

    With SPD, ``L_SPD = BCE(blend_head(f([x_pos, x_neg])), [0, 1])``: a linear binary head on the
    backbone features tells a weak augmentation (0) from a SmoothBlended one (1), weighted by eta.
    There is no embedding to compare, so this replaces the cosine SPD loss of the SSL methods.
    """

    name = "supervised"
    base_view_names = ("image",)
    default_recipe = Recipe(
        optimizer="sgd", base_lr=0.1, weight_decay=1e-4, momentum=0.9, batch_size=256, epochs=90, warmup_epochs=0
    )

    def __init__(self, backbone: ResNet, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        if num_classes is None or num_classes < 2:
            raise ConfigError(f"supervised pre-training needs num_classes >= 2, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.classifier = nn.Linear(self.feature_dim, self.num_classes)
        self.blend_head = nn.Linear(self.feature_dim, 1) if self.spd else None

    def base_views(self, image_size: int) -> dict[str, ViewFn]:
        return {"image": supervised_augmentation(image_size)}

    def base_loss(self, views: Mapping[str, torch.Tensor], labels: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        if labels is None:
            raise ValueError("supervised: class labels are required")
        logits = self.classifier(self.backbone(views["image"]))
        return F.cross_entropy(logits, labels), None

    def spd_objective(
        self, z_anchor: torch.Tensor | None, positive: torch.Tensor, negative: torch.Tensor
    ) -> torch.Tensor:
        assert self.blend_head is not None  # built whenever self.spd
        logits = self.blend_head(self.backbone(torch.cat([positive, negative], dim=0))).squeeze(1)
        target = torch.cat([torch.zeros(positive.shape[0]), torch.ones(negative.shape[0])]).to(logits)
        return F.binary_cross_entropy_with_logits(logits, target)
