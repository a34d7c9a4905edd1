"""SimCLR (Chen et al., ICML 2020): NT-Xent over the (global) batch, 2-layer projection head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet

from spotdiff.augment.views import ViewFn, ssl_augmentation
from spotdiff.pretrain.base import PretrainMethod, Recipe, gather_with_grad, world_info


def simclr_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """``in -> hidden (BN, ReLU) -> out``: the paper's nonlinear projection head (BN as in its code)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of the local pairs ``(z1[i], z2[i])`` against the 2N projections of all ranks.

    ``z1``, ``z2``: ``(B, D)`` L2-normalised. Each of the 2B local rows is classified among the
    ``2N - 1`` other rows of the global batch (N = B * world size); the loss is the mean over local
    rows, so averaging it over ranks gives the single-process loss of the global batch.
    """
    rank, _ = world_info()
    bsz = z1.shape[0]
    all1, all2 = gather_with_grad(z1), gather_with_grad(z2)
    n = all1.shape[0]
    keys = torch.cat([all1, all2], dim=0)  # (2N, D)
    queries = torch.cat([z1, z2], dim=0)  # (2B, D)
    logits = queries @ keys.t() / temperature
    local = torch.arange(bsz, device=z1.device) + rank * bsz
    self_index = torch.cat([local, local + n])
    positive = torch.cat([local + n, local])
    rows = torch.arange(2 * bsz, device=z1.device)
    logits = logits.index_put((rows, self_index), logits.new_full((), float("-inf")))
    return F.cross_entropy(logits, positive)


class SimCLR(PretrainMethod):
    """SimCLR: both views in one forward (BN over 2B), NT-Xent; the SPD anchor is ``z1``."""

    name = "simclr"
    base_view_names = ("view1", "view2")
    default_recipe = Recipe(
        optimizer="lars", base_lr=0.3, weight_decay=1e-6, momentum=0.9, batch_size=4096, epochs=100, warmup_epochs=10
    )
    hparam_defaults: ClassVar[dict[str, Any]] = {"dim": 128, "hidden_dim": None, "temperature": 0.1}
    exclude_norm_and_bias_from_wd = True

    def __init__(
        self, backbone: ResNet, dim: int = 128, hidden_dim: int | None = None, temperature: float = 0.1, **kwargs: Any
    ) -> None:
        super().__init__(backbone, **kwargs)
        self.head = simclr_head(self.feature_dim, hidden_dim or self.feature_dim, dim)
        self.temperature = float(temperature)

    def base_views(self, image_size: int) -> dict[str, ViewFn]:
        strong = ssl_augmentation(image_size, crop_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2))
        return {"view1": strong, "view2": strong}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)

    def base_loss(
        self, views: Mapping[str, torch.Tensor], labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = self.embed(torch.cat([views["view1"], views["view2"]], dim=0)).chunk(2, dim=0)
        return nt_xent(z1, z2, self.temperature), z1
