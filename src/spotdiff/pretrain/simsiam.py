"""SimSiam (Chen & He, CVPR 2021): two views, projector + predictor, stop-gradient, negative cosine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet

from spotdiff.augment.views import ViewFn, ssl_augmentation
from spotdiff.pretrain.base import PretrainMethod, Recipe


def simsiam_projector(in_dim: int, dim: int) -> nn.Sequential:
    """3-layer MLP with BN on every layer, last BN without affine (the paper's projector)."""
    return nn.Sequential(
        nn.Linear(in_dim, dim, bias=False),
        nn.BatchNorm1d(dim),
        nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False),
        nn.BatchNorm1d(dim),
        nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False),
        nn.BatchNorm1d(dim, affine=False),
    )


def simsiam_predictor(dim: int, pred_dim: int) -> nn.Sequential:
    """2-layer bottleneck MLP ``dim -> pred_dim -> dim`` (BN + ReLU in the hidden layer)."""
    return nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True), nn.Linear(pred_dim, dim)
    )


class SimSiam(PretrainMethod):
    """``L = -(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``; the SPD anchor is ``z1`` (projector output)."""

    name = "simsiam"
    base_view_names = ("view1", "view2")
    default_recipe = Recipe(
        optimizer="sgd", base_lr=0.05, weight_decay=1e-4, momentum=0.9, batch_size=512, epochs=100, warmup_epochs=0
    )
    hparam_defaults: ClassVar[dict[str, Any]] = {"proj_dim": 2048, "pred_dim": 512}
    fixed_lr_prefixes = ("predictor.",)
    zero_init_residual = True  # the reference builds its encoder with zero_init_residual=True

    def __init__(self, backbone: ResNet, proj_dim: int = 2048, pred_dim: int = 512, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        self.projector = simsiam_projector(self.feature_dim, proj_dim)
        self.predictor = simsiam_predictor(proj_dim, pred_dim)

    def base_views(self, image_size: int) -> dict[str, ViewFn]:
        strong = ssl_augmentation(image_size)
        return {"view1": strong, "view2": strong}

    def _project(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._project(images), dim=1)

    def base_loss(
        self, views: Mapping[str, torch.Tensor], labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # One forward per view, as in the paper (BN statistics per view).
        z1, z2 = self._project(views["view1"]), self._project(views["view2"])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = -0.5 * (
            F.cosine_similarity(p1, z2.detach(), dim=1).mean() + F.cosine_similarity(p2, z1.detach(), dim=1).mean()
        )
        return loss, F.normalize(z1, dim=1)
