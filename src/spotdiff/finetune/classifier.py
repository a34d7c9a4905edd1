"""Binary anomaly classifier: a torchvision ResNet with a one-logit head.

The image score is the anomaly probability ``sigmoid(logit)``; training uses binary
cross-entropy on the logit (``label`` 1 = anomalous, 0 = normal).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import ResNet


class BinaryClassifier(nn.Module):
    """ResNet body (any weights) + global average pooling + ``Linear(C, 1)``.

    Args:
        backbone: a torchvision ResNet, e.g. from :func:`spotdiff.models.build_backbone`;
            its ``fc`` layer is replaced by the new one-logit head.
    """

    def __init__(self, backbone: ResNet) -> None:
        super().__init__()
        in_features = backbone.fc.in_features
        backbone.fc = nn.Linear(in_features, 1)
        self.backbone = backbone

    @property
    def head(self) -> nn.Linear:
        """The new, randomly initialised layer (trained with a larger learning rate)."""
        return self.backbone.fc

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(encoder parameters, new-layer parameters)``: the ResNet body, and the head."""
        head = list(self.head.parameters())
        head_ids = {id(p) for p in head}
        return [p for p in self.backbone.parameters() if id(p) not in head_ids], head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` ImageNet-normalised images -> ``(B,)`` anomaly logits."""
        return self.backbone(images).squeeze(1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Mean binary cross-entropy of ``(B,)`` logits against ``(B,)`` labels in {0, 1}."""
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``(B,)`` anomaly probabilities in [0, 1]; no pixel map (``None``)."""
        return torch.sigmoid(self(images)), None
