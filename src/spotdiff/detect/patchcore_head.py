"""The fitted head of PatchCore: patch features -> nearest bank element -> maps and paper eq. 7 scores.

Built by :meth:`spotdiff.detect.PatchCore.head`; see :mod:`spotdiff.detect.head` for the two modes
and :mod:`spotdiff.detect.patchcore` for the method. The two swappable parts:

* the nearest-neighbour search: eager, the detector's ``search`` (faiss ``IndexFlatL2`` or the exact
  chunked torch search, :func:`spotdiff.detect.patchcore.nearest_neighbors`); traceable, one matrix
  product ``[q, 1] @ [-2 b^T; ||b||^2]`` read by an arg-min (or top-k), ``||q||^2`` added after;
* the channel reduction (``target_dim``): eager, 1-D adaptive average pooling
  (:func:`spotdiff.detect.features.pool_channels`); traceable, the same linear map as a matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.models import ResNet

from spotdiff.detect.features import assemble_patchcore, pool_channels
from spotdiff.detect.head import DetectorHead

Search = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""``search(queries (Q, C), k)`` -> Euclidean distances ``(Q, k)`` and bank row indices ``(Q, k)``, ascending."""


class PatchCoreHead(DetectorHead):
    """PatchCore's fitted head (``forward``: normalised ``(B, 3, H, W)`` -> scores ``(B,)``, maps ``(B, H, W)``).

    Args:
        bank: ``(M, C)`` float32 memory bank (held, not copied).
        num_neighbors: ``b`` of the eq. 7 re-weighting (capped at ``M``).
        target_dim: channels after reduction, or None (no reduction).
        search: the eager nearest-neighbour search (required unless ``traceable``; ignored then).
        Others: see :class:`~spotdiff.detect.head.DetectorHead`.
    """

    bank: torch.Tensor
    bank_aug: torch.Tensor  # traceable only
    channel_pool: torch.Tensor  # traceable with target_dim only

    def __init__(
        self,
        backbone: ResNet,
        layers: Sequence[str],
        image_size: tuple[int, int],
        bank: torch.Tensor,
        num_neighbors: int,
        target_dim: int | None,
        channels: int,
        traceable: bool = False,
        search: Search | None = None,
    ) -> None:
        super().__init__(backbone, layers, image_size, traceable, bank.device)
        if traceable:
            search = self._matrix_search
        elif search is None:
            raise ValueError("the eager PatchCore head needs a nearest-neighbour search")
        self.search: Search = search
        self.register_buffer("bank", bank)
        self.num_neighbors = min(int(num_neighbors), bank.shape[0])
        self.target_dim = target_dim if target_dim is not None and target_dim != channels else None
        if traceable:
            # [-2 b^T; ||b||^2] (C + 1, M): [q, 1] @ it = ||b||^2 - 2 q.b in one matrix product
            self.register_buffer("bank_aug", torch.cat([-2.0 * bank.T, (bank * bank).sum(dim=1)[None]]).contiguous())
            if self.target_dim is not None:  # adaptive average pooling is linear: its effect on unit vectors
                eye = torch.eye(channels, dtype=torch.float64)
                self.register_buffer("channel_pool", pool_channels(eye, self.target_dim).to(torch.float32))

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, P, C)`` locally aware patch features of normalised images, ``P = h * w``."""
        emb = assemble_patchcore(self.backbone_features(images), self.layers)
        b, c, h, w = emb.shape
        patches = emb.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.target_dim is None:
            return patches
        if self.traceable:
            return torch.matmul(patches, self.channel_pool)
        return pool_channels(patches.reshape(b * h * w, c), self.target_dim).reshape(b, h * w, self.target_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.patches(images)
        b, p, c = patches.shape
        dist, nearest = self.search(patches.reshape(b * p, c), 1)
        patch_scores = dist[:, 0].reshape(b, p).to(self.bank.device)
        scores = self.reweighted_scores(patches, patch_scores, nearest[:, 0].reshape(b, p))
        return scores, self.maps(patch_scores.reshape(b, *self.grid))

    def reweighted_scores(
        self, patches: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor
    ) -> torch.Tensor:
        """Paper eq. 7: ``patches (B, P, C)``, ``patch_scores (B, P)``, their nearest bank rows ``(B, P)`` -> ``(B,)``.

        ``s*`` is the largest patch distance, ``m_test*`` that patch, ``m*`` its nearest bank row and
        ``N_b(m*)`` the ``b`` nearest bank rows of ``m*``; score ``= (1 - exp(s*) / sum exp(||m_test* - m||)) s*``.
        """
        bank = self.bank
        best = patch_scores.argmax(dim=1, keepdim=True)  # (B, 1)
        s_star = patch_scores.gather(1, best)[:, 0]  # (B,)
        m_test = patches.gather(1, best[:, :, None].expand(-1, 1, patches.shape[-1]))  # (B, 1, C)
        m_star = bank.index_select(0, nearest.to(bank.device).gather(1, best)[:, 0])  # (B, C)
        _, support = self.search(m_star, self.num_neighbors)  # (B, b)
        neighbours = bank.index_select(0, support.to(bank.device).reshape(-1)).reshape(*support.shape, -1)
        d_support = torch.linalg.vector_norm(neighbours - m_test, dim=-1)  # (B, b)
        weight = 1.0 - torch.exp(s_star - torch.logsumexp(d_support, dim=1))
        return weight * s_star

    def _matrix_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The traceable exact search: ``||q - b||^2 = ||q||^2 + (||b||^2 - 2 q.b)``, the row constant added
        after the minimum, so the ``(Q, M)`` table is written by one product and read by one arg-min."""
        partial = torch.matmul(F.pad(queries, (0, 1), value=1.0), self.bank_aug)  # (Q, M)
        if k == 1:
            index = partial.argmin(dim=1, keepdim=True)
            best = partial.gather(1, index)
        else:
            best, index = torch.topk(partial, k, dim=1, largest=False)
        return torch.sqrt(torch.clamp(best + (queries * queries).sum(-1, keepdim=True), min=0.0)), index
