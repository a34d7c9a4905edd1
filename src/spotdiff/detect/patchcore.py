"""PatchCore (Roth et al., CVPR 2022): nearest-neighbour distance to a coreset of normal patches.

* Patch features: :func:`spotdiff.detect.features.patchcore_embedding` (3x3 local averaging,
  deeper layer bilinearly upsampled, concatenated).
* Memory bank: every training patch, reduced by greedy k-center coreset selection
  (:func:`greedy_coreset`) computed on a Gaussian random projection of the features.
* Pixel map: Euclidean distance of each test patch to its nearest bank element, bilinearly
  upsampled to the image size and smoothed with a Gaussian of sigma 4 px.
* Image score (paper, eq. 7): let ``s*`` be the largest patch distance, ``m_test*`` that patch,
  ``m*`` its nearest bank element and ``N_b(m*)`` the ``b`` nearest bank elements of ``m*``
  (``m*`` included). Score ``= w * s*`` with
  ``w = 1 - exp(s*) / sum_{m in N_b(m*)} exp(||m_test* - m||)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import torch
from torch.utils.data import Dataset

from spotdiff.detect.base import Detector
from spotdiff.detect.features import check_layers, patchcore_embedding, upsample_and_smooth
from spotdiff.errors import ConfigError, WeightsError
from spotdiff.progress import bar

_CHUNK_BYTES = 64 << 20

try:  # faiss is a declared dependency; the torch path is kept for platforms without wheels
    import faiss

    HAVE_FAISS = True
except ImportError:  # pragma: no cover - depends on the platform
    faiss = None
    HAVE_FAISS = False


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Johnson-Lindenstrauss projection ``features @ R``, ``R`` Gaussian with variance ``1 / dim``.

    Squared distances are preserved in expectation. Computed in row chunks. ``(M, C) -> (M, dim)``.
    """
    generator = torch.Generator().manual_seed(seed)
    proj = torch.randn(features.shape[1], dim, generator=generator) / math.sqrt(dim)
    proj = proj.to(features.device, features.dtype)
    rows = max(1, _CHUNK_BYTES // (4 * features.shape[1]))
    return torch.cat([features[i : i + rows] @ proj for i in range(0, features.shape[0], rows)])


def greedy_coreset(
    features: torch.Tensor, n_select: int, projection_dim: int | None = 128, seed: int = 0
) -> torch.Tensor:
    """Greedy k-center selection: indices of ``n_select`` rows of ``features`` ``(M, C)``.

    The first centre is a random row (from ``seed``); each next centre is the row farthest from
    all chosen centres. A running vector of squared distances to the nearest centre is kept and
    updated with one matrix-vector product per new centre (``|z|^2 - 2 z.c + |c|^2``), so one
    iteration costs O(M * dim) with no per-point Python work. Distances are measured after a
    random projection to ``projection_dim`` dimensions (None or >= C: no projection).
    """
    m = features.shape[0]
    if not 1 <= n_select <= m:
        raise ConfigError(f"cannot select {n_select} of {m} patches")
    if projection_dim is not None and projection_dim < features.shape[1]:
        z = random_projection(features, projection_dim, seed)
    else:
        z = features
    # (dim, M) layout: a row-vector times matrix product streams memory contiguously, which is
    # several times faster on CPU than a matrix-vector product over (M, dim) rows
    z_t = z.float().T.contiguous()
    sq_norm = torch.einsum("ij,ij->j", z_t, z_t)
    generator = torch.Generator().manual_seed(seed)
    current = int(torch.randint(m, (1,), generator=generator))
    selected = torch.empty(n_select, dtype=torch.int64)
    min_dist = torch.full((1, m), float("inf"), dtype=z_t.dtype, device=z_t.device)
    dist = torch.empty_like(min_dist)
    progress_bar = bar(total=n_select, desc="coreset")
    for i in range(n_select):
        selected[i] = current
        torch.matmul(z_t[:, current][None], z_t, out=dist)
        dist.mul_(-2.0).add_(sq_norm).add_(sq_norm[current])
        torch.minimum(min_dist, dist, out=min_dist)
        current = int(torch.argmax(min_dist))
        if i % 256 == 0:
            progress_bar.update(min(256, n_select - i))
    progress_bar.close()
    return selected


def nearest_neighbors(
    queries: torch.Tensor, bank: torch.Tensor, k: int, index: Any | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances ``(Q, k)`` and indices ``(Q, k)`` of the ``k`` nearest bank rows, ascending.

    Uses ``index`` (a faiss ``IndexFlatL2`` over ``bank``) when given, otherwise exact chunked
    torch distances.
    """
    k = min(k, bank.shape[0])
    if index is not None:
        sq, idx = index.search(np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32), k)
        return torch.from_numpy(sq).clamp_(min=0).sqrt_(), torch.from_numpy(idx).to(torch.int64)
    bank_sq = torch.einsum("ij,ij->i", bank, bank)
    rows = max(1, _CHUNK_BYTES // (4 * bank.shape[0]))
    dists, idxs = [], []
    for i in range(0, queries.shape[0], rows):
        q = queries[i : i + rows]
        sq = (torch.einsum("ij,ij->i", q, q)[:, None] + bank_sq[None] - 2.0 * q @ bank.T).clamp_(min=0)
        d, j = torch.topk(sq, k, dim=1, largest=False)
        dists.append(d.sqrt_())
        idxs.append(j)
    return torch.cat(dists), torch.cat(idxs)


class PatchCore(Detector):
    """PatchCore anomaly detector.

    Args:
        arch, weights, seed: backbone (see :class:`spotdiff.detect.PaDiM`).
        layers: default ``layer2`` + ``layer3``.
        coreset_ratio: fraction of training patches kept in the memory bank (1.0 keeps all).
        projection_dim: random-projection size used only for coreset selection.
        num_neighbors: ``b`` of the image-score reweighting.
        target_dim: optional channel reduction (adaptive average pooling) of patch features.
        nn_backend: ``"faiss"``, ``"torch"`` or ``"auto"`` (faiss when installed).
    """

    model_type = "patchcore"

    def __init__(
        self,
        arch: str = "wide_resnet50_2",
        weights: str | os.PathLike[str] | None = None,
        layers: Sequence[str] = ("layer2", "layer3"),
        coreset_ratio: float = 0.1,
        projection_dim: int | None = 128,
        num_neighbors: int = 9,
        target_dim: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        nn_backend: str = "auto",
    ) -> None:
        layers = check_layers(layers)
        super().__init__(arch, weights, layers, seed, batch_size, device, num_workers)
        if not 0.0 < coreset_ratio <= 1.0:
            raise ConfigError(f"coreset ratio must be in (0, 1], got {coreset_ratio}")
        if num_neighbors < 1:
            raise ConfigError(f"num_neighbors must be >= 1, got {num_neighbors}")
        if nn_backend not in ("auto", "faiss", "torch"):
            raise ConfigError(f"nn_backend must be auto, faiss or torch, got {nn_backend!r}")
        if nn_backend == "faiss" and not HAVE_FAISS:
            raise ConfigError("nn_backend 'faiss' requested but faiss is not installed")
        self.coreset_ratio = float(coreset_ratio)
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.target_dim = target_dim
        self.nn_backend = nn_backend
        self.memory_bank: torch.Tensor | None = None
        self._index: Any | None = None

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, h, w, C)`` patch features of normalised images."""
        return patchcore_embedding(self.backbone, images, self.layers, self.target_dim).permute(0, 2, 3, 1)

    @torch.inference_mode()
    def fit(self, dataset: Dataset) -> Self:
        """Collect all training patches into one preallocated bank, then subsample it by coreset."""
        self.image_size = None
        n_images = len(dataset)  # type: ignore[arg-type]
        bank: torch.Tensor | None = None
        row = 0
        for images in self._training_batches(dataset, desc="PatchCore features"):
            emb = self._embed(images)
            patches = emb.reshape(-1, emb.shape[-1])
            if bank is None:
                per_image = emb.shape[1] * emb.shape[2]
                bank = torch.empty(n_images * per_image, emb.shape[-1], dtype=torch.float32, device=self.device)
            bank[row : row + patches.shape[0]] = patches
            row += patches.shape[0]
        assert bank is not None
        bank = bank[:row]
        n_keep = max(1, int(row * self.coreset_ratio))
        if n_keep < row:
            keep = greedy_coreset(bank, n_keep, self.projection_dim, self.seed)
            bank = bank[keep.to(bank.device)]
        self._set_bank(bank.contiguous())
        return self

    def _set_bank(self, bank: torch.Tensor) -> None:
        self.memory_bank = bank
        self._index = None
        if self.nn_backend in ("auto", "faiss") and HAVE_FAISS:
            self._index = faiss.IndexFlatL2(bank.shape[1])
            self._index.add(np.ascontiguousarray(bank.cpu().numpy(), dtype=np.float32))

    def _predict_normalized(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.memory_bank is not None and self.image_size is not None
        emb = self._embed(images)
        b, h, w, c = emb.shape
        patches = emb.reshape(-1, c)
        dist, nn_idx = nearest_neighbors(patches, self.memory_bank, 1, self._index)
        patch_scores = dist[:, 0].reshape(b, h * w).to(self.device)
        scores = self._reweighted_scores(patches.reshape(b, h * w, c), patch_scores, nn_idx[:, 0].reshape(b, h * w))
        maps = upsample_and_smooth(patch_scores.reshape(b, h, w), self.image_size)
        return scores, maps

    def _reweighted_scores(
        self, patches: torch.Tensor, patch_scores: torch.Tensor, nn_idx: torch.Tensor
    ) -> torch.Tensor:
        """Paper eq. 7 (see module docstring); ``patches (B, P, C)``, ``patch_scores (B, P)`` -> ``(B,)``."""
        assert self.memory_bank is not None
        bank = self.memory_bank
        best = patch_scores.argmax(dim=1)
        rows = torch.arange(patches.shape[0])
        s_star = patch_scores[rows, best]  # (B,)
        m_test = patches[rows, best]  # (B, C)
        m_star = bank[nn_idx[rows, best].to(bank.device)]  # (B, C)
        _, support = nearest_neighbors(m_star, bank, self.num_neighbors, self._index)  # (B, b)
        d_support = torch.linalg.vector_norm(bank[support.to(bank.device)] - m_test[:, None], dim=-1)  # (B, b)
        weight = 1.0 - torch.exp(s_star - torch.logsumexp(d_support, dim=1))
        return weight * s_star

    def _config(self) -> dict[str, Any]:
        return {
            "coreset_ratio": self.coreset_ratio,
            "projection_dim": self.projection_dim,
            "num_neighbors": self.num_neighbors,
            "target_dim": self.target_dim,
        }

    def _state(self) -> dict[str, torch.Tensor]:
        assert self.memory_bank is not None
        return {"memory_bank": self.memory_bank}

    @classmethod
    def _from_config(cls, config: dict[str, Any], device: str | torch.device) -> Self:
        return cls(
            arch=config["arch"], layers=config["layers"], coreset_ratio=float(config["coreset_ratio"]),
            projection_dim=config["projection_dim"], num_neighbors=int(config["num_neighbors"]),
            target_dim=config["target_dim"], seed=int(config["seed"]), device=device,
        )

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        bank = tensors.get("memory_bank")
        if bank is None or bank.ndim != 2 or bank.shape[0] == 0:
            raise WeightsError("PatchCore model file lacks a non-empty 2-D 'memory_bank' tensor")
        self._set_bank(bank.to(self.device, torch.float32).contiguous())
