"""PaDiM (Defard et al., 2021): one multivariate Gaussian per feature position.

Fitting streams over the training set: per position only running sums are kept (see
:class:`GaussianAccumulator`; float32 sums of shifted samples for float32 features), so memory
does not grow with the number of images. The covariance of position ``p`` is the unbiased
estimate (divisor ``N - 1``) plus ``epsilon * I``; it is stored as the inverse of its Cholesky
factor ``L`` (``Sigma = L L^T``) so that the Mahalanobis distance is ``||L^-1 (x - mu)||``, one
batched matrix product over all positions. ``L^-1`` is kept packed (its lower triangle, the
``torch.tril_indices`` order) in memory as on disk, and unpacked a few positions at a time.

Anomaly map: Mahalanobis distance on the ``layers[0]`` grid, bilinearly upsampled to the image
size, smoothed with a Gaussian of sigma 4 px. Image score: maximum of the map.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

import numpy as np
import torch
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits
from torch.utils.data import Dataset

from spotdiff.detect.base import Detector
from spotdiff.detect.features import padim_embedding, upsample_and_smooth
from spotdiff.detect.memory import check_fits
from spotdiff.errors import ConfigError, DataError, WeightsError
from spotdiff.models import WeightsLike, layer_channels

DEFAULT_DIMS = {"resnet18": 100, "resnet50": 550, "wide_resnet50_2": 550}
"""Random channel subset size per backbone, as in the PaDiM paper."""

STAGE_IMAGES = 16
"""Training images folded into the sums at once (see :class:`GaussianAccumulator`). Each fold reads
and writes all of ``S2``, so a larger stage is fewer passes over it: at d = 550 and 4096 positions,
one thread, 116 / 98 / 57 CPU ms per image at 8 / 16 / 32 staged (load 1; 114 / 86 / 61 at load 4),
for a staging buffer of
72 / 144 / 288 MB (0.03x / 0.06x / 0.12x the packed model; ``benchmarks/results_detect.md``).
16 is our compromise: with 8 the 900-image fit peaked at 1.26x the model above its baseline,
and issue 15 caps it at 1.3x."""
_CHUNK_BYTES = 16 << 20  # working memory per position chunk (one full (p, d, d) float64 block)
UNPACKED_FACTOR_BYTES = 1 << 30
"""``predict`` keeps an unpacked ``(P, d, d)`` copy of ``L^-1`` when it is at most this large
(resnet18, d = 100, 256 px: 164 MB), which makes the Mahalanobis step about 3x faster; larger
factors (resnet50, d = 550: 5 GB) are unpacked a few positions at a time instead."""
_POTRF, _TRTRI = lapack.dpotrf, lapack.dtrtri
_FOLD_POSITIONS = 64  # positions per fold step (a (64, stage, d) centred copy of the staged samples)


def packed_size(dim: int) -> int:
    """Entries of one packed ``d x d`` triangle: ``d (d + 1) / 2``."""
    return dim * (dim + 1) // 2


def _inverse_cholesky(cov: np.ndarray) -> np.ndarray:
    """``L^-1`` (C order, zeros above the diagonal) of one symmetric positive definite float64 ``(d, d)``.

    A symmetric matrix's C-order buffer read in Fortran order is the same matrix, and Fortran's
    upper triangle ``U`` (``A = U^T U``) is C's lower ``L``; ``U^-1`` in Fortran order is ``L^-1``
    in C order.
    """
    upper, info = _POTRF(cov.T, lower=0, clean=1, overwrite_a=1)
    if info > 0:
        raise DataError("covariance is not positive definite; increase epsilon")
    inverse, info = _TRTRI(upper, lower=0, overwrite_c=1)
    if info != 0:
        raise DataError("covariance is singular; increase epsilon")
    return inverse.T


def unpack_lower(packed: torch.Tensor, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(P, d (d + 1) / 2)`` lower triangles (``torch.tril_indices`` order) -> ``(P, d, d)``, zeros above.

    ``out`` (``(P, d, d)``, upper triangle already zero) is reused when given.
    """
    rows, cols = torch.tril_indices(dim, dim, device=packed.device)
    if out is None:
        out = packed.new_zeros(packed.shape[0], dim, dim)
    out.view(packed.shape[0], dim * dim).index_copy_(1, rows * dim + cols, packed)
    return out


class GaussianAccumulator:
    """Streaming mean and covariance of ``P`` positions x ``d`` features.

    Keeps, per position, ``S1 = sum(x - c)`` (float64) and the upper triangle of
    ``S2 = sum((x - c)(x - c)^T)`` in the samples' dtype (float32 features: float32 sums, float64
    samples: float64 sums, the reference), where the shift ``c`` is the mean of the first samples.
    The shift makes the terms of ``S2`` small and centred, so the final ``S2 - S1 S1^T / N`` does
    not cancel and float32 keeps about 6-7 significant digits of the covariance (measured in
    ``benchmarks/results_detect.md``).

    Layout of ``S2`` (our choice, for speed): the rows of the triangle in blocks of ``ROW_BLOCK``;
    block ``i`` holds rows ``[s, s + b)`` from column ``s`` on, a ``b x (d - s)`` matrix, so each fold
    is one ``baddbmm`` per block straight into the sums (about half the products of a full Gram
    matrix and no packing pass). That stores ``d (d + b) / 2`` values per position, at most
    ``1 + b / d`` times the packed triangle (1.06 at d = 550). Memory: ``P`` such rows plus ``P * d``
    float64 and a staging buffer of ``stage`` samples, independent of the number of samples.

    Samples are staged and folded ``stage`` at a time, so ``S2`` receives ``N / stage`` additions
    of ``stage``-sample products (a two-level summation) rather than ``N``. The factorisation runs
    in float64 on chunks of positions. :meth:`inverse_cholesky_packed` writes the packed ``L^-1``
    (``d (d + 1) / 2`` per position, contiguous) over the start of the sums' own buffer, so
    finishing needs no extra memory.
    """

    ROW_BLOCK = 32

    def __init__(self, positions: int, dim: int, stage: int = STAGE_IMAGES) -> None:
        if stage < 1:
            raise ValueError(f"stage must be >= 1, got {stage}")
        self.positions, self.dim, self.stage = positions, dim, stage
        self.count = 0  # samples added, staged ones included
        self.chunk = max(1, _CHUNK_BYTES // (8 * dim * dim))
        self.blocks = self.row_blocks(dim)  # (first row, last row + 1, offset in a row of S2)
        self.width = self.blocks[-1][2] + (self.blocks[-1][1] - self.blocks[-1][0]) * (dim - self.blocks[-1][0])
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(positions, dim, dtype=torch.float64)
        self.sum_sq: torch.Tensor | None = None  # (P, width), allocated with the first samples, in their dtype
        self._staged: torch.Tensor | None = None
        self._n_staged = 0
        self._finalised = False

    @classmethod
    def row_blocks(cls, dim: int) -> list[tuple[int, int, int]]:
        """``(start, stop, offset)`` of each block of triangle rows in a row of ``S2``."""
        blocks, offset = [], 0
        for start in range(0, dim, cls.ROW_BLOCK):
            stop = min(start + cls.ROW_BLOCK, dim)
            blocks.append((start, stop, offset))
            offset += (stop - start) * (dim - start)
        return blocks

    @classmethod
    def nbytes(cls, positions: int, dim: int, stage: int = STAGE_IMAGES, itemsize: int = 4) -> int:
        """Bytes the accumulator allocates (sums, shift, staging buffer, one chunk of temporaries)."""
        start, stop, offset = cls.row_blocks(dim)[-1]
        width = offset + (stop - start) * (dim - start)
        chunk = max(1, _CHUNK_BYTES // (8 * dim * dim))
        return (positions * width * itemsize + positions * dim * (8 + itemsize)
                + stage * positions * dim * itemsize + 4 * chunk * dim * dim * 8)

    def _spans(self, chunk: int | None = None) -> list[tuple[int, int]]:
        step = chunk or self.chunk
        return [(p, min(p + step, self.positions)) for p in range(0, self.positions, step)]

    def _buffer(self) -> torch.Tensor:
        if self._finalised:
            raise RuntimeError("accumulator already finalised by inverse_cholesky()")
        assert self.sum_sq is not None
        return self.sum_sq

    def _block(self, sums: torch.Tensor, block: tuple[int, int, int]) -> torch.Tensor:
        """View ``(p, rows, d - start)`` of one row block in ``sums`` (``(p, width)`` rows of ``S2``)."""
        start, stop, offset = block
        size = (stop - start) * (self.dim - start)
        return sums[:, offset : offset + size].unflatten(1, (stop - start, self.dim - start))

    def update(self, x: torch.Tensor) -> None:
        """Add samples ``x`` of shape ``(n, P, d)``, float32 or float64."""
        if x.ndim != 3 or x.shape[1:] != (self.positions, self.dim):
            raise ValueError(f"expected (n, {self.positions}, {self.dim}), got {tuple(x.shape)}")
        if self._finalised:
            raise RuntimeError("accumulator already finalised by inverse_cholesky()")
        x = x.cpu()
        if x.dtype != torch.float64:
            x = x.to(torch.float32)
        if self._staged is None:
            self.shift = x.mean(dim=0)  # kept in the samples' dtype: any fixed shift is exact
            self._staged = torch.empty(self.stage, self.positions, self.dim, dtype=x.dtype)
            self.sum_sq = torch.zeros(self.positions, self.width, dtype=x.dtype)
        while x.shape[0]:
            take = min(x.shape[0], self.stage - self._n_staged)
            self._staged[self._n_staged : self._n_staged + take] = x[:take]
            self._n_staged += take
            self.count += take
            x = x[take:]
            if self._n_staged == self.stage:
                self._fold()

    def _fold(self) -> None:
        """Add the staged samples to ``S1`` and ``S2`` (one ``baddbmm`` per row block and position chunk)."""
        if not self._n_staged:
            return
        assert self._staged is not None and self.shift is not None
        sum_sq = self._buffer()
        x = self._staged[: self._n_staged]
        for start, stop in self._spans(_FOLD_POSITIONS):
            xc = (x[:, start:stop] - self.shift[start:stop]).transpose(0, 1).contiguous()  # (p, n, d)
            self.sum[start:stop] += xc.sum(dim=1, dtype=torch.float64)
            xt = xc.transpose(1, 2)  # (p, d, n)
            for block in self.blocks:
                self._block(sum_sq[start:stop], block).baddbmm_(xt[:, block[0] : block[1]], xc[:, :, block[0] :])
        self._n_staged = 0

    def mean(self) -> torch.Tensor:
        """``(P, d)`` float64 mean."""
        self._check_count(1)
        self._fold()
        assert self.shift is not None
        return self.shift.to(torch.float64) + self.sum / self.count

    def _check_count(self, minimum: int) -> None:
        if self.count < minimum:
            raise DataError(f"PaDiM needs at least {minimum} training image(s), got {self.count}")

    def _chunk_covariance(self, start: int, stop: int) -> torch.Tensor:
        sums = self._buffer()[start:stop]
        full = torch.zeros(stop - start, self.dim, self.dim, dtype=torch.float64)
        for block in self.blocks:
            full[:, block[0] : block[1], block[0] :] = self._block(sums, block)
        full = full.triu_()
        full += full.triu(1).transpose(1, 2)
        s1 = self.sum[start:stop]
        full.baddbmm_(s1[:, :, None], s1[:, None, :], alpha=-1.0 / self.count)  # S2 - S1 S1^T / N
        return full.div_(self.count - 1)

    def covariance(self) -> torch.Tensor:
        """``(P, d, d)`` float64 unbiased covariance (divisor ``N - 1``), without regularisation."""
        self._check_count(2)
        self._fold()
        return torch.cat([self._chunk_covariance(a, b) for a, b in self._spans()])

    def inverse_cholesky_packed(self, epsilon: float) -> torch.Tensor:
        """``(P, d (d + 1) / 2)`` ``L^-1`` packed (lower triangle, ``torch.tril_indices`` order),
        ``L L^T = covariance + epsilon * I``; in the samples' dtype (float32 for features).

        The factorisation runs in float64, a chunk of positions at a time, through LAPACK's
        ``potrf`` (Cholesky) and ``trtri`` (triangular inverse, ``d^3 / 3`` flops) from scipy, one
        position per task on ``torch.get_num_threads()`` threads with single-threaded BLAS: about
        3x faster than ``torch.linalg.cholesky`` + ``solve_triangular(L, I)`` (``d^3`` flops) at
        d = 550, to 1e-15 (``benchmarks/results_detect.md``). Consumes the accumulator: the result
        is written into the flat buffer of ``S2``, position ``p`` at ``p * d (d + 1) / 2``; that
        never reaches past the end of the chunk just read (rows of ``S2`` are longer), so unread
        sums are never overwritten. No further update is possible.
        """
        self._check_count(2)
        self._fold()
        flat = self._buffer().view(-1)
        d, size = self.dim, packed_size(self.dim)
        lower_rows, lower_cols = torch.tril_indices(d, d)
        lower = lower_rows * d + lower_cols
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool, threadpool_limits(1, user_api="blas"):
            for start, stop in self._spans():
                cov = self._chunk_covariance(start, stop)
                cov.diagonal(dim1=-2, dim2=-1).add_(epsilon)
                inv = torch.from_numpy(np.stack(list(pool.map(_inverse_cholesky, cov.numpy()))))
                del cov
                flat[start * size : stop * size] = inv.flatten(1).index_select(1, lower).flatten()
        self._finalised = True
        self._staged = None
        self.sum_sq = None
        return flat[: self.positions * size].view(self.positions, size)

    def inverse_cholesky(self, epsilon: float) -> torch.Tensor:
        """``(P, d, d)`` ``L^-1`` (lower triangular): :meth:`inverse_cholesky_packed`, unpacked."""
        return unpack_lower(self.inverse_cholesky_packed(epsilon), self.dim)


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, inv_chol: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Mahalanobis distance ``sqrt((x - mu)^T Sigma^-1 (x - mu))`` per position, batched.

    Args:
        x: ``(B, P, d)`` samples; mean: ``(P, d)``; inv_chol: ``(P, d, d)`` with ``Sigma^-1 = L^-T L^-1``,
            or packed ``(P, d (d + 1) / 2)`` (see :func:`unpack_lower`), unpacked ``chunk`` positions
            at a time (``chunk`` then capped so one unpacked block stays under 16 MB).
        chunk: positions per step (bounds the temporaries to ``3 * B * chunk * d`` values).
    Returns:
        ``(B, P)`` distances.
    """
    d = x.shape[2]
    packed = inv_chol.ndim == 2
    block = None
    if packed:
        chunk = max(1, min(chunk, _CHUNK_BYTES // (inv_chol.element_size() * d * d)))
        block = inv_chol.new_zeros(chunk, d, d)
    out = x.new_empty(x.shape[:2])
    for start in range(0, x.shape[1], chunk):
        stop = min(start + chunk, x.shape[1])
        diff = (x[:, start:stop] - mean[start:stop]).transpose(0, 1)  # (p, B, d)
        if block is not None:
            factor = unpack_lower(inv_chol[start:stop], d, block[: stop - start])
        else:
            factor = inv_chol[start:stop]
        z = torch.bmm(diff, factor.transpose(1, 2))  # rows are L^-1 (x - mu)
        out[:, start:stop] = torch.linalg.vector_norm(z, dim=-1).T
    return out


def channel_subset(arch: str, layers: Sequence[str], d: int | None, seed: int) -> tuple[int, torch.Tensor]:
    """``(d_, index)``: ``d`` (None: ``DEFAULT_DIMS[arch]``) capped at the channel count of ``layers``, and
    the sorted random subset of that many concatenated channels drawn from ``seed``."""
    total = sum(layer_channels(arch, layers))
    d_ = min(DEFAULT_DIMS[arch] if d is None else d, total)
    generator = torch.Generator().manual_seed(seed)
    return d_, torch.randperm(total, generator=generator)[:d_].sort().values


class PaDiM(Detector):
    """PaDiM anomaly detector.

    Args:
        arch: ``resnet18``, ``resnet50`` or ``wide_resnet50_2``.
        weights: backbone weights: ``"imagenet"``, a torchvision weights name, a ``.pth`` or
            ``.safetensors`` file (see :func:`spotdiff.models.load_weights`), or None / ``"random"``
            for a random init drawn from ``seed``.
        layers: backbone stages, shallow to deep; the map lives on the first one's grid.
        d: number of channels kept (random subset drawn from ``seed``); default per ``arch``
            (100 for resnet18, 550 otherwise); capped at the total channel count.
        epsilon: covariance regulariser ``epsilon * I``.
        batch_size: images per loader batch and backbone forward pass (on CPU at most
            ``CPU_FORWARD_IMAGES`` = 4, which is as fast and bounds memory); num_workers: image-decoding
            threads (None: one per spare core, see :func:`spotdiff.data.loader.decode_workers`);
            device: where features are computed.
    """

    model_type = "padim"

    def __init__(
        self,
        arch: str = "resnet18",
        weights: WeightsLike = None,
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        d: int | None = None,
        epsilon: float = 0.01,
        seed: int = 0,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        num_workers: int | None = None,
    ) -> None:
        super().__init__(arch, weights, layers, seed, batch_size, device, num_workers)
        self.d = d
        self.epsilon = epsilon

    def check_params(self) -> Self:
        super().check_params()
        if self.d is not None and self.d < 1:
            raise ConfigError(f"d must be >= 1, got {self.d}")
        if self.epsilon <= 0:
            raise ConfigError(f"epsilon must be > 0, got {self.epsilon}")
        return self

    def _build_backbone(self, weights: WeightsLike) -> None:
        """Also draws the channel subset: ``d_`` (``d`` capped at the channel count) and ``channel_index_``."""
        super()._build_backbone(weights)
        self.d_, self.channel_index_ = channel_subset(self.arch, self.layers_, self.d, self.seed)
        self.mean_: torch.Tensor | None = None
        self.inv_chol_packed_: torch.Tensor | None = None
        """``(P, d (d + 1) / 2)`` float32 lower triangle of ``L^-1`` (``torch.tril_indices`` order);
        see :attr:`inv_chol_` for the square form."""
        self._unpacked: tuple[torch.Tensor, torch.Tensor] | None = None  # (packed, its unpacked copy)
        self._grid: tuple[int, int] = (0, 0)  # (h, w) of the last embedding

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, P, d)`` patch embeddings of normalised images, ``P = h * w``."""
        emb = padim_embedding(self.backbone_, images, self.layers_, self.channel_index_, self.arch)
        self._grid = (emb.shape[-2], emb.shape[-1])
        return emb.flatten(2).transpose(1, 2)

    @property
    def inv_chol_(self) -> torch.Tensor | None:
        """``(P, d, d)`` float32 ``L^-1``, unpacked from :attr:`inv_chol_packed_` on each access
        (``P * d^2`` floats: at d = 550 on a 64 x 64 grid, 5 GB; prediction never calls it)."""
        return None if self.inv_chol_packed_ is None else unpack_lower(self.inv_chol_packed_, self.d_)

    @torch.inference_mode()
    def fit(self, dataset: Dataset) -> Self:
        """Estimate the per-position Gaussians from normal images (streaming float32 sums, float64 factorisation).

        Before the sums are allocated their size is checked against the available memory
        (:func:`spotdiff.detect.memory.check_fits`).
        """
        self._start_fit()
        acc: GaussianAccumulator | None = None
        n_images = len(dataset)  # type: ignore[arg-type]
        for images in self._training_batches(dataset, desc="PaDiM features"):
            emb = self._embed(images)
            if acc is None:
                self._check_training_size(n_images, emb.shape[1])
                acc = GaussianAccumulator(emb.shape[1], emb.shape[2])
            acc.update(emb)
        assert acc is not None
        if acc.count < 2:
            raise DataError(f"PaDiM needs at least 2 training images, got {acc.count}")
        self.mean_ = acc.mean().to(torch.float32).to(self.device_)
        self.inv_chol_packed_ = acc.inverse_cholesky_packed(self.epsilon).to(self.device_)
        self._check_fitted("mean", self.mean_)
        self._check_fitted("inverse Cholesky factors", self.inv_chol_packed_)
        return self

    def _check_training_size(self, n_images: int, positions: int) -> None:
        """Refuse statistics that would not fit in memory; warn when ``N - 1 < d``."""
        grid = f"{self._grid[0]}x{self._grid[1]}"
        check_fits(GaussianAccumulator.nbytes(positions, self.d_),
                   f"PaDiM statistics (d={self.d_}, {grid} positions, {positions} x d(d+1)/2 float32)",
                   "a smaller --d or --image-size")
        if 2 <= n_images <= self.d_:
            print(f"warning: PaDiM: {n_images} training images give a sample covariance of rank at most "
                f"{n_images - 1} < d = {self.d_}; it is invertible only through the regulariser "
                f"epsilon * I = {self.epsilon:g} * I. Use at least {self.d_ + 1} images or a smaller --d.", file=sys.stderr)

    def _predict_normalized(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.mean_ is not None and self.inv_chol_packed_ is not None and self.image_size_ is not None
        emb = self._embed(images)
        if emb.shape[1] != self.mean_.shape[0]:
            raise DataError(f"feature grid {self._grid} does not match the fitted model")
        factor = self.inv_chol_packed_
        if self.mean_.shape[0] * self.d_**2 * 4 <= UNPACKED_FACTOR_BYTES:
            if self._unpacked is None or self._unpacked[0] is not factor:
                self._unpacked = (factor, unpack_lower(factor, self.d_))
            factor = self._unpacked[1]
        dists = mahalanobis(emb, self.mean_, factor).reshape(-1, *self._grid)
        maps = upsample_and_smooth(dists, self.image_size_)
        return maps.flatten(1).amax(dim=1), maps

    def _config(self) -> dict[str, Any]:
        return {"d": self.d_, "epsilon": float(self.epsilon)}

    def _state(self) -> dict[str, torch.Tensor]:
        """The lower-triangular ``L^-1`` is saved packed, as held in memory (exact: its upper triangle is 0)."""
        assert self.mean_ is not None and self.inv_chol_packed_ is not None
        return {"mean": self.mean_, "inv_cholesky_packed": self.inv_chol_packed_, "channel_index": self.channel_index_}

    @classmethod
    def _from_config(cls, config: dict[str, Any], device: str | torch.device) -> Self:
        return cls(
            arch=config["arch"], layers=config["layers"], d=int(config["d"]), epsilon=float(config["epsilon"]),
            seed=int(config["seed"]), device=device,
        )

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            mean, packed, index = tensors["mean"], tensors["inv_cholesky_packed"], tensors["channel_index"]
        except KeyError as exc:
            raise WeightsError(f"PaDiM model file lacks tensor {exc.args[0]!r}") from exc
        if mean.ndim != 2:
            raise WeightsError("PaDiM model tensors have inconsistent shapes")
        p, d = mean.shape
        if packed.shape != (p, d * (d + 1) // 2) or index.shape != (d,) or d != self.d_:
            raise WeightsError("PaDiM model tensors have inconsistent shapes")
        self.channel_index_ = index.to(torch.int64)
        self.mean_ = mean.to(self.device_, torch.float32)
        self.inv_chol_packed_ = packed.to(self.device_, torch.float32).contiguous()
