"""The fitted head of PaDiM: selected channels -> Mahalanobis distance per position -> maps and scores.

Built by :meth:`spotdiff.detect.PaDiM.head`; see :mod:`spotdiff.detect.head` for the two modes.
The distance is ``||L^-1 (x - mu)||`` per position. Eager: :func:`spotdiff.detect.gaussian.mahalanobis`
over a few positions at a time, on the square or the packed ``L^-1`` (unpacked by blocks). Traceable:
one batched matrix product over all positions with the square ``L^-1``.
Image score: the maximum of the map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.models import ResNet

from spotdiff.detect.features import assemble_padim, padim_channel_groups
from spotdiff.detect.gaussian import mahalanobis
from spotdiff.detect.head import DetectorHead
from spotdiff.errors import DataError, WeightsError


class PaDiMHead(DetectorHead):
    """PaDiM's fitted head (``forward``: normalised ``(B, 3, H, W)`` -> scores ``(B,)``, maps ``(B, H, W)``).

    Args:
        arch, channel_index: the backbone and the sorted channel subset (numbered through ``layers``).
        mean: ``(P, d)`` float32 per-position mean, ``P = h * w``.
        inv_chol: ``(P, d, d)`` ``L^-1``, or (eager only) packed ``(P, d (d + 1) / 2)``.
        Others: see :class:`~spotdiff.detect.head.DetectorHead`. The tensors are held, not copied.
    """

    mean: torch.Tensor
    inv_chol: torch.Tensor

    def __init__(
        self,
        backbone: ResNet,
        arch: str,
        layers: Sequence[str],
        image_size: tuple[int, int],
        channel_index: torch.Tensor,
        mean: torch.Tensor,
        inv_chol: torch.Tensor,
        traceable: bool = False,
    ) -> None:
        super().__init__(backbone, layers, image_size, traceable, mean.device)
        if self.grid[0] * self.grid[1] != mean.shape[0]:
            error = WeightsError if traceable else DataError
            raise error(f"PaDiM grid {self.grid} does not match its {mean.shape[0]} fitted positions")
        if traceable and inv_chol.ndim != 3:
            raise ValueError("the traceable PaDiM head needs the square (P, d, d) inverse Cholesky factors")
        self.groups: list[tuple[str, str]] = []  # (layer, name of its channel-index buffer)
        for i, (name, inside) in enumerate(padim_channel_groups(arch, self.layers, channel_index.cpu())):
            self.register_buffer(f"index_{i}", inside.to(mean.device))
            self.groups.append((name, f"index_{i}"))
        self.register_buffer("mean", mean)
        self.register_buffer("inv_chol", inv_chol)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone_features(images)
        groups = [(name, getattr(self, buffer)) for name, buffer in self.groups]
        emb = assemble_padim(feats, groups, self.grid).flatten(2).transpose(1, 2)  # (B, P, d)
        dists = self.distances(emb).reshape(-1, *self.grid)
        maps = self.maps(dists)
        return maps.flatten(1).amax(dim=1), maps

    def distances(self, emb: torch.Tensor) -> torch.Tensor:
        """``(B, P, d)`` embeddings -> ``(B, P)`` Mahalanobis distances."""
        if not self.traceable:
            return mahalanobis(emb, self.mean, self.inv_chol)
        # rows L^-1 (x - mu) of all positions in one product; onnxruntime folds the constant transpose once
        z = torch.matmul((emb - self.mean).transpose(0, 1), self.inv_chol.transpose(1, 2))  # (P, B, d)
        return torch.sqrt((z * z).sum(dim=-1)).transpose(0, 1)
