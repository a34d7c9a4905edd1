"""MoCo v2 (Chen et al. 2020): momentum key encoder, queue of negatives, InfoNCE, MLP head."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet

from spotdiff.augment.views import ViewFn, ssl_augmentation
from spotdiff.pretrain.base import PretrainMethod, Recipe, gather_no_grad


def mlp_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's 2-layer MLP head ``in -> hidden -> ReLU -> out``."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class MoCo(PretrainMethod):
    """MoCo v2: ``q`` from view1 (query encoder), ``k`` from view2 (momentum encoder, no gradient),

    ``L = CE([q.k, q.queue] / T, 0)``; keys are enqueued (gathered from every rank under DDP) after
    the loss. The SPD anchor is ``q`` and positives/negatives use the query encoder.
    BN: plain BN on one device, SyncBatchNorm under DDP (the loop converts it) instead of the
    paper's shuffle-BN.
    """

    name = "moco"
    base_view_names = ("view1", "view2")
    default_recipe = Recipe(optimizer="sgd", base_lr=0.03, weight_decay=1e-4, momentum=0.9,
                            batch_size=256, epochs=200, warmup_epochs=0)
    hparam_defaults: dict[str, Any] = {"dim": 128, "hidden_dim": None, "queue_size": 65536,
                                       "key_momentum": 0.999, "temperature": 0.2}

    def __init__(
        self, backbone: ResNet, dim: int = 128, hidden_dim: int | None = None, queue_size: int = 65536,
        key_momentum: float = 0.999, temperature: float = 0.2, **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        self.head = mlp_head(self.feature_dim, hidden_dim or self.feature_dim, dim)
        self.key_backbone = copy.deepcopy(self.backbone)
        self.key_head = copy.deepcopy(self.head)
        for p in (*self.key_backbone.parameters(), *self.key_head.parameters()):
            p.requires_grad_(False)
        self.key_momentum = float(key_momentum)
        self.temperature = float(temperature)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def base_views(self, image_size: int) -> dict[str, ViewFn]:
        strong = ssl_augmentation(image_size)
        return {"view1": strong, "view2": strong}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)

    @torch.no_grad()
    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_head(self.key_backbone(images)), dim=1)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        keys = gather_no_grad(keys)
        size = self.queue.shape[0]
        keys = keys[-size:]
        index = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def base_loss(
        self, views: Mapping[str, torch.Tensor], labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.embed(views["view1"])
        k = self._keys(views["view2"])
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ self.queue.clone().detach().to(q.dtype).t()
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        if self.training:
            self._enqueue(k)
        return loss, q

    @torch.no_grad()
    def after_step(self) -> None:
        """Momentum update of the key encoder: ``k = m * k + (1 - m) * q`` (parameters only)."""
        m = self.key_momentum
        for query, key in ((self.backbone, self.key_backbone), (self.head, self.key_head)):
            q_params = list(query.parameters())
            k_params = list(key.parameters())
            torch._foreach_mul_(k_params, m)
            torch._foreach_add_(k_params, q_params, alpha=1.0 - m)
