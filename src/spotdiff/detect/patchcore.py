"""PatchCore (Roth et al., CVPR 2022): nearest-neighbour distance to a coreset of normal patches.

* Patch features: :func:`spotdiff.detect.features.patchcore_embedding` (3x3 local averaging,
  deeper layer bilinearly upsampled, concatenated).
* Memory bank: every training patch, reduced by greedy k-center coreset selection
  (:func:`greedy_coreset`) computed on a Gaussian random projection of the features. The full
  bank is never held in memory: fitting keeps only the projected features (``M x 128``) and
  streams the full ones to a temporary file, from which the selected rows are read back. Above
  ``coreset_shard`` patches the selection is approximated by running the greedy on contiguous
  shards of the training patches (:func:`sharded_coreset`).
* Pixel map: Euclidean distance of each test patch to its nearest bank element, bilinearly
  upsampled to the image size and smoothed with a Gaussian of sigma 4 px.
* The pixel map and image score are computed by the fitted head,
  :class:`spotdiff.detect.patchcore_head.PatchCoreHead` (:meth:`PatchCore.head`), which ``predict``
  and ``export`` run.
* Image score (paper, eq. 7): let ``s*`` be the largest patch distance, ``m_test*`` that patch,
  ``m*`` its nearest bank element and ``N_b(m*)`` the ``b`` nearest bank elements of ``m*``
  (``m*`` included). Score ``= w * s*`` with
  ``w = 1 - exp(s*) / sum_{m in N_b(m*)} exp(||m_test* - m||)``.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import torch

from spotdiff.data.loader import ItemDataset
from spotdiff.detect.base import Detector
from spotdiff.detect.coreset import greedy_k_center
from spotdiff.detect.features import patchcore_embedding
from spotdiff.detect.memory import check_memory_fits, format_bytes
from spotdiff.detect.patchcore_head import PatchCoreHead
from spotdiff.detect.schema import MIN_NEIGHBORS
from spotdiff.errors import ConfigError, WeightsError
from spotdiff.models import WeightsLike, layer_channels

_CHUNK_BYTES = 64 << 20
DEFAULT_CORESET_SHARD = 1 << 16
"""Most patches per greedy k-center run (64 images at 256 px on ``layer2``). Our choice: the greedy
costs ``ratio * M^2`` distance updates, so sharding keeps it linear in ``M``; measured at 1
thread, one 61,440-patch shard at ratio 0.1 takes about 4 CPU s (12.8 s with the previous loop;
``benchmarks/coreset_bench.py``)."""

try:  # faiss is optional (extra `faiss`); without it nn_backend="auto" uses the exact torch search
    import faiss

    HAVE_FAISS = True
except ImportError:  # tested in a subprocess (tests/test_patchcore.py)
    faiss = None  # type: ignore[assignment]  # the optional module is absent
    HAVE_FAISS = False


def projection_matrix(channels: int, dim: int, seed: int) -> torch.Tensor:
    """``(channels, dim)`` float64 Gaussian matrix with variance ``1 / dim`` (Johnson-Lindenstrauss)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(channels, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)


def project(features: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``features @ matrix`` ``(M, C) -> (M, dim)`` float32, computed in float64 row chunks.

    The float64 product rounded to float32 does not depend on how rows are chunked (summation-order
    differences are ~1e-16, far below float32's rounding), so projecting a bank batch by batch while
    it streams gives the same values as projecting it whole.
    """
    matrix = matrix.to(features.device)
    rows = max(1, _CHUNK_BYTES // (8 * features.shape[1]))
    return torch.cat([(features[i : i + rows].double() @ matrix).float() for i in range(0, features.shape[0], rows)])


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Johnson-Lindenstrauss projection ``features @ R`` (``R = projection_matrix(C, dim, seed)``).

    Squared distances are preserved in expectation. ``(M, C) -> (M, dim)`` float32.
    """
    return project(features, projection_matrix(features.shape[1], dim, seed))


def greedy_coreset(
    features: torch.Tensor, n_select: int, projection_dim: int | None = 128, seed: int = 0
) -> torch.Tensor:
    """Greedy k-center selection: indices of ``n_select`` rows of ``features`` ``(M, C)``.

    The first centre is a random row (from ``seed``); each next centre is the row farthest from
    all chosen centres (ties: lowest index), measured after a random projection to
    ``projection_dim`` dimensions (None or >= C: no projection) on the float32 rows. Exact and
    fast: :func:`spotdiff.detect.coreset.greedy_k_center`.
    """
    m = features.shape[0]
    if not 1 <= n_select <= m:
        raise ConfigError(f"cannot select {n_select} of {m} patches")
    if projection_dim is not None and projection_dim < features.shape[1]:
        z = random_projection(features, projection_dim, seed)
    else:
        z = features
    first = int(torch.randint(m, (1,), generator=torch.Generator().manual_seed(seed)))
    return greedy_k_center(z.float(), n_select, first)


def sharded_coreset(z: torch.Tensor, n_select: int, shard: int | None, seed: int = 0) -> torch.Tensor:
    """Indices of ``n_select`` rows of the (projected) ``z`` ``(M, dim)``: exact greedy k-center when
    ``shard`` is None or ``M <= shard``; otherwise an approximation.

    Approximation (our choice): the rows are cut into ``ceil(M / shard)`` contiguous, near-equal
    shards (consecutive training images); each keeps its share of ``n_select`` (proportional to
    its size, remainders to the first shards) by its own exact greedy run (seed ``seed + s``).
    The union covers every shard as well as a greedy on it alone, so it covers the whole
    set, but centres are not shared across shards (slightly more redundancy than one run). The
    cost drops from ``n_select * M`` to ``n_select * shard`` distance updates.
    """
    m = z.shape[0]
    if shard is None or m <= shard:
        return greedy_coreset(z, n_select, None, seed)
    n_shards = -(-m // shard)
    bounds = [round(i * m / n_shards) for i in range(n_shards + 1)]
    quota = [n_select * (b - a) // m for a, b in zip(bounds, bounds[1:])]
    for i in range(n_select - sum(quota)):
        quota[i] += 1
    parts = [
        greedy_coreset(z[a:b], q, None, seed + i) + a for i, (a, b, q) in enumerate(zip(bounds, bounds[1:], quota)) if q
    ]
    return torch.cat(parts)


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
        coreset_shard: most patches per greedy run; above it the coreset is approximated by
            shards (:func:`sharded_coreset`); None = exact greedy on all patches.
        spill_dir: directory of the temporary file of full patch features during ``fit``
            (None: the system temporary directory); the file is unlinked at once and removed
            when ``fit`` ends.
    """

    model_type = "patchcore"

    def __init__(
        self,
        arch: str = "wide_resnet50_2",
        weights: WeightsLike = None,
        layers: Sequence[str] = ("layer2", "layer3"),
        coreset_ratio: float = 0.1,
        projection_dim: int | None = 128,
        num_neighbors: int = 9,
        target_dim: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        num_workers: int | None = None,
        nn_backend: str = "auto",
        coreset_shard: int | None = DEFAULT_CORESET_SHARD,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(arch, weights, layers, seed, batch_size, device, num_workers)
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.target_dim = target_dim
        self.nn_backend = nn_backend
        self.coreset_shard = coreset_shard
        self.spill_dir = spill_dir

    def check_params(self) -> Self:
        super().check_params()
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ConfigError(
                f"coreset ratio must be in (0, 1] (the fraction of training patches kept), got {self.coreset_ratio}"
            )
        if (
            isinstance(self.num_neighbors, bool)
            or not isinstance(self.num_neighbors, int)
            or self.num_neighbors < MIN_NEIGHBORS
        ):
            raise ConfigError(
                f"num_neighbors must be an integer >= {MIN_NEIGHBORS} (with one neighbour the "
                f"score's weight, paper eq. 7, is 0 for every image), got {self.num_neighbors}"
            )
        channels = sum(layer_channels(self.arch, self.layers))
        if self.target_dim is not None and not 1 <= self.target_dim <= channels:
            raise ConfigError(
                f"target_dim must be in [1, {channels}] (the channels of {list(self.layers)}), got {self.target_dim}"
            )
        if self.nn_backend not in ("auto", "faiss", "torch"):
            raise ConfigError(f"nn_backend must be auto, faiss or torch, got {self.nn_backend!r}")
        if self.nn_backend == "faiss" and not HAVE_FAISS:
            raise ConfigError("nn_backend 'faiss' requested but faiss is not installed")
        if self.coreset_shard is not None and self.coreset_shard < 1:
            raise ConfigError(
                f"coreset_shard must be >= 1 patch (or None for the exact greedy), got {self.coreset_shard}"
            )
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ConfigError(f"projection_dim must be >= 1 (or None), got {self.projection_dim}")
        return self

    def _build_backbone(self, weights: WeightsLike) -> None:
        super()._build_backbone(weights)
        self.memory_bank_: torch.Tensor | None = None
        """``(n_keep, C)`` float32 coreset of the training patch features."""
        self._index: Any | None = None
        self._head: PatchCoreHead | None = None  # the eager head of the current bank

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, h, w, C)`` patch features of normalised images."""
        return patchcore_embedding(self.backbone_, images, self.layers_, self.target_dim).permute(0, 2, 3, 1)

    @torch.inference_mode()
    def fit(self, dataset: ItemDataset) -> Self:
        """Select the memory bank from the patches of normal images without holding them all.

        One pass over the images keeps the projected patches (``M x projection_dim`` float32) and
        appends the full ones to an unlinked temporary file in ``spill_dir`` (default: the system
        temporary directory); the coreset is chosen on the projections (:func:`sharded_coreset`)
        and its rows are read back from the file, a block at a time. The bank equals
        ``features[greedy_coreset(features, n, projection_dim, seed)]`` of the materialised
        features when ``coreset_shard`` does not apply (tested). Memory is checked before the
        projections are allocated.
        """
        self._start_fit()
        n_images = len(dataset)
        z: torch.Tensor | None = None
        matrix: torch.Tensor | None = None
        row = 0
        with tempfile.TemporaryFile(dir=self.spill_dir) as spill:
            for images in self._training_batches(dataset, desc="PatchCore features"):
                patches = self._embed(images)
                patches = patches.reshape(-1, patches.shape[-1]).cpu()
                if z is None:
                    channels = patches.shape[1]
                    total = n_images * patches.shape[0] // images.shape[0]
                    width = channels if self.projection_dim is None else min(self.projection_dim, channels)
                    projected = width < channels
                    self._bank_rows(total)  # refused before the long feature pass
                    self._check_memory(total, channels, width)
                    matrix = projection_matrix(channels, width, self.seed) if projected else None
                    z = torch.empty(total, width, dtype=torch.float32)
                z[row : row + patches.shape[0]] = patches if matrix is None else project(patches, matrix)
                if matrix is not None:
                    spill.write(patches.to(torch.float32).contiguous().numpy().tobytes())
                row += patches.shape[0]
            assert z is not None
            z = z[:row]
            n_keep = self._bank_rows(row)
            if n_keep < row:
                keep = sharded_coreset(z.to(self.device_), n_keep, self.coreset_shard, self.seed).cpu()
            else:
                keep = torch.arange(row)
            if matrix is None:  # no projection: z holds the features themselves
                bank = z[keep]
            else:
                del z
                bank = _read_rows(spill, keep, channels)
        self._check_fitted("memory bank", bank)
        self._set_bank(bank.to(self.device_).contiguous())
        return self

    def _bank_rows(self, patches: int) -> int:
        """Rows the coreset keeps of ``patches``; ConfigError when fewer than ``num_neighbors`` (the
        score of eq. 7 needs that many bank rows; a 1-row bank scores every image 0)."""
        n_keep = max(1, int(patches * self.coreset_ratio))
        if n_keep < self.num_neighbors:
            raise ConfigError(
                f"coreset ratio {self.coreset_ratio:g} keeps {n_keep} of {patches} training patches, "
                f"fewer than num_neighbors = {self.num_neighbors}, the bank rows the score needs: "
                f"raise --coreset-ratio to at least {self.num_neighbors / patches:.2g} or give more "
                "training images"
            )
        return n_keep

    def _check_memory(self, patches: int, channels: int, width: int) -> None:
        """One line naming the figure and the option that reduces it, before anything large is allocated."""
        kept = max(1, int(patches * self.coreset_ratio))
        searched = patches if self.coreset_shard is None else min(patches, self.coreset_shard)
        # float32 projections, the greedy's float64 centred copy of one shard with its per-row vectors
        # (detect/coreset.py), the bank and faiss's copy of it
        need = 4 * (patches * width + 2 * kept * channels) + 8 * searched * (width + 6)
        check_memory_fits(
            need,
            f"PatchCore on {patches} patches x {channels} channels (projections {patches} x {width} "
            f"float32, bank {kept} x {channels})",
            "a smaller --coreset-ratio or --image-size",
        )
        spill_free = _free_disk(self.spill_dir)
        if width < channels and 4 * patches * channels > spill_free:
            raise ConfigError(
                f"PatchCore streams {format_bytes(4 * patches * channels)} of patch features to a "
                f"temporary file but only {format_bytes(spill_free)} is free in "
                f"{self.spill_dir or tempfile.gettempdir()}; set TMPDIR or reduce --image-size"
            )

    def _set_bank(self, bank: torch.Tensor) -> None:
        self.memory_bank_ = bank
        self._index = None
        self._head = None
        if self.nn_backend in ("auto", "faiss") and HAVE_FAISS:
            self._index = faiss.IndexFlatL2(bank.shape[1])
            self._index.add(np.ascontiguousarray(bank.cpu().numpy(), dtype=np.float32))

    def head(self, traceable: bool = False) -> PatchCoreHead:
        """The fitted head (:class:`~spotdiff.detect.patchcore_head.PatchCoreHead`).

        Eager (``predict``): the model's backbone and bank, searched by :func:`nearest_neighbors` (faiss
        when the model has an index). ``traceable`` (``export``): a CPU float32 copy of the backbone and
        bank with the matrix-product search; the model is not changed.
        """
        if self.memory_bank_ is None or self.image_size_ is None:
            raise ConfigError("PatchCore is not fitted; call fit() or load() first")
        channels = sum(layer_channels(self.arch, self.layers_))
        if traceable:
            return PatchCoreHead(
                copy.deepcopy(self.backbone_).cpu(),
                self.layers_,
                self.image_size_,
                self.memory_bank_.detach().to("cpu", torch.float32, copy=True).contiguous(),
                self.num_neighbors,
                self.target_dim,
                channels,
                traceable=True,
            ).eval()
        if self._head is None or self._head.backbone is not self.backbone_:
            bank, index = self.memory_bank_, self._index
            self._head = PatchCoreHead(
                self.backbone_,
                self.layers_,
                self.image_size_,
                bank,
                self.num_neighbors,
                self.target_dim,
                channels,
                search=lambda queries, k: nearest_neighbors(queries, bank, k, index),
            )
        return self._head

    def _reweighted_scores(
        self, patches: torch.Tensor, patch_scores: torch.Tensor, nn_idx: torch.Tensor
    ) -> torch.Tensor:
        """Paper eq. 7 (see module docstring) as the eager head computes it; ``patches (B, P, C)``,
        ``patch_scores (B, P)``, ``nn_idx (B, P)`` -> ``(B,)``."""
        return self.head().reweighted_scores(patches, patch_scores, nn_idx)

    def _config(self) -> dict[str, Any]:
        return {
            "coreset_ratio": float(self.coreset_ratio),
            "projection_dim": self.projection_dim,
            "num_neighbors": self.num_neighbors,
            "target_dim": self.target_dim,
            "coreset_shard": self.coreset_shard,
        }

    def _state(self) -> dict[str, torch.Tensor]:
        assert self.memory_bank_ is not None
        return {"memory_bank": self.memory_bank_}

    @classmethod
    def _from_config(cls, config: dict[str, Any], device: str | torch.device) -> Self:
        return cls(
            arch=config["arch"],
            layers=config["layers"],
            coreset_ratio=float(config["coreset_ratio"]),
            projection_dim=config["projection_dim"],
            num_neighbors=int(config["num_neighbors"]),
            target_dim=config["target_dim"],
            seed=int(config["seed"]),
            device=device,
            coreset_shard=config.get("coreset_shard", DEFAULT_CORESET_SHARD),
        )

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        bank = tensors.get("memory_bank")
        if bank is None or bank.ndim != 2 or bank.shape[0] == 0:
            raise WeightsError("PatchCore model file lacks a non-empty 2-D 'memory_bank' tensor")
        self._set_bank(bank.to(self.device_, torch.float32).contiguous())


def _read_rows(spill: Any, rows: torch.Tensor, channels: int) -> torch.Tensor:
    """Rows ``rows`` (in that order) of the ``(M, channels)`` float32 matrix written to the file ``spill``.

    The file is read sequentially in blocks of about 64 MB; only the wanted rows are kept.
    """
    order = torch.argsort(rows)
    wanted = rows[order].numpy()
    out = torch.empty(rows.numel(), channels, dtype=torch.float32)
    block = max(1, _CHUNK_BYTES // (4 * channels))
    spill.seek(0)
    start, i = 0, 0
    while i < wanted.size:
        data = np.frombuffer(spill.read(4 * block * channels), dtype=np.float32).reshape(-1, channels)
        stop = start + data.shape[0]
        if data.shape[0] == 0:
            raise RuntimeError("temporary feature file ended early")  # pragma: no cover - disk error
        j = int(np.searchsorted(wanted, stop, side="left"))
        if j > i:
            out[order[i:j]] = torch.from_numpy(data[wanted[i:j] - start].copy())
        i, start = j, stop
    return out


def _free_disk(directory: str | os.PathLike[str] | None) -> int:
    try:
        stat = os.statvfs(directory or tempfile.gettempdir())
    except (OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62
    return stat.f_bavail * stat.f_frsize
