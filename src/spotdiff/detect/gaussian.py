"""Streaming Gaussian statistics of PaDiM: running sums per feature position, the inverse Cholesky
factor by LAPACK on a thread pool, packed triangles and the batched Mahalanobis distance.

Used by :mod:`spotdiff.detect.padim`; measurements of the staging and factorisation choices are in
``benchmarks/results_detect.md`` and ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from spotdiff.errors import DataError

STAGE_IMAGES = 16
"""Training images folded into the sums at once (see :class:`GaussianAccumulator`). Each fold reads
and writes all of ``S2``, so a larger stage is fewer passes over it but a larger staging buffer:
16 is our compromise between fit speed and peak memory (measured in
``benchmarks/results_detect.md``)."""
_CHUNK_BYTES = 16 << 20  # working memory per position chunk (one full (p, d, d) float64 block)
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
        return (
            positions * width * itemsize
            + positions * dim * (8 + itemsize)
            + stage * positions * dim * itemsize
            + 4 * chunk * dim * dim * 8
        )

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
