"""Exact greedy k-center (farthest-point) selection at matrix-product speed: PatchCore's coreset.

The selection is the textbook greedy: start at row ``first``; each next centre is the row whose
squared Euclidean distance to its nearest chosen centre is largest, ties going to the lowest row
index (:func:`greedy_k_center`).

Why it is fast (our construction): the plain loop does one matrix-vector product over all rows
per centre, which is memory-bound (every centre streams the whole ``(M, dim)`` matrix). Here
centres are chosen in *rounds*:

1. take the ``candidates`` rows with the largest upper bound on their distance;
2. choose centres among them one after another (their distances to each other come from one
   ``L x L`` product), as long as the best candidate's *lower* bound beats the upper bound of
   every row outside the candidates, so that each choice is provably the plain loop's;
3. lower every row's distance to the round's centres with one product per cache-sized tile.

Distances are screened in float64 by the expansion ``|y_p|^2 - 2 y_p.y_c + |y_c|^2`` of the
centred rows, with a proven bound on its rounding error; where the bounds of two rows overlap (a
tie, or a near one), their distances are recomputed from the differences and the exact rule
decides. :class:`CoresetStats` counts those decisions. A float32 screen (``screen_dtype``) gives
the same selection, but on real PatchCore features its bounds overlap at most steps
(``benchmarks/coreset_bench.py``), so it is not the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spotdiff.errors import ConfigError
from spotdiff.progress import bar

_TILE_BYTES = 1 << 20  # rows x centres per product tile on one thread: stays in a 1 MiB L2 cache
_PARALLEL_TILE_BYTES = 16 << 20  # on more threads: fewer, larger parallel regions (measured: 3x less
# CPU time at 2 threads on a loaded 2-core machine, where every region waits for a busy core)
_CHUNK_ROWS = 8192  # rows per step when building the screen (bounds its float64 temporaries)
_EXACT_BYTES = 8 << 20  # float64 difference temporaries of the exact decisions


@dataclass
class CoresetStats:
    """Counters of one :func:`greedy_k_center` run (for benchmarks)."""

    rounds: int = 0
    """candidate rounds (each ends with one tiled product over all rows)."""
    single_steps: int = 0
    """centres chosen outside a round (no candidate could be separated from the other rows)."""
    exact_decisions: int = 0
    """choices that needed distances from the differences (screen bounds overlapped)."""
    screen_would_differ: int = 0
    """of those, choices where the screen's argmax (lowest row on its ties) was another row."""
    exact_pairs: int = 0
    """row-centre distances computed from the differences."""


def greedy_k_center(
    z: torch.Tensor,
    n_select: int,
    first: int,
    candidates: int = 1024,
    screen_dtype: torch.dtype = torch.float64,
    stats: CoresetStats | None = None,
) -> torch.Tensor:
    """Row indices ``(n_select,)`` int64 chosen by greedy k-center on ``z`` ``(M, dim)`` from row ``first``.

    Equal to the plain loop ``d = min(d, |z - z[c]|^2); c = argmax(d)`` (first index on ties)
    with ``|z - z[c]|^2`` summed in float64 from the differences (tested). The screen's squared
    distance is within ``g (|y_p| + |y_c|)^2`` of the exact one (``y`` the centred rows,
    ``g = 1.1 (2 dim + 16) u``, ``u`` the unit roundoff of ``screen_dtype``: the summation bound
    ``gamma_(dim+1)`` of the product for any summation order, the roundings of the norms, of the
    centring and of the bound arithmetic, with 10 % to spare), so each row carries the bound
    ``g (|y_p| + max |y|)^2``. Memory: ``M x (dim + 1)`` of ``screen_dtype`` plus a few ``M``-vectors.
    """
    m = z.shape[0]
    if not 1 <= n_select <= m:
        raise ConfigError(f"cannot select {n_select} of {m} patches")
    if not 0 <= first < m:
        raise ConfigError(f"first centre {first} is not a row of the {m} patches")
    if screen_dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        raise ConfigError(
            "a float32 screen needs full float32 products (torch.set_float32_matmul_precision('highest'))"
        )
    screen = _Screen(z, screen_dtype)
    exact = _ExactDistances(z)
    stats = stats if stats is not None else CoresetStats()
    selected = [int(first)]
    screen.apply(selected)
    progress_bar = bar(total=n_select, desc="coreset")
    progress_bar.update(1)
    while len(selected) < n_select:
        done = len(selected)
        _choose_round(screen, exact, selected, n_select, min(candidates, m), stats)
        if len(selected) == done:
            _choose_one(screen, exact, selected, stats)
        screen.apply(selected[done:])
        progress_bar.update(len(selected) - done)
    progress_bar.close()
    return torch.tensor(selected, dtype=torch.int64)


class _Screen:
    """Squared distance of every row to its nearest centre in ``dtype``, with a per-row error bound.

    ``rows`` holds ``[y, 1]`` (``y`` = centred rows) so that one product gives
    ``y_p . y_c - |y_c|^2 / 2`` for a centre stored as ``[y_c, -|y_c|^2 / 2]``; the distance is
    ``|y_p|^2 - 2 max_c(...)``.
    """

    def __init__(self, z: torch.Tensor, dtype: torch.dtype) -> None:
        m, dim = z.shape
        mean = torch.mean(z.detach(), 0, dtype=torch.float64)
        if not bool(torch.isfinite(mean).all()):  # float64 sums of float32 rows cannot overflow
            raise ConfigError("patch features contain NaN or infinite values; cannot choose a coreset")
        self.rows = torch.ones(m, dim + 1, dtype=dtype, device=z.device)
        norm = torch.empty(m, dtype=torch.float64, device=z.device)
        for a in range(0, m, _CHUNK_ROWS):
            self.rows[a : a + _CHUNK_ROWS, :dim] = z[a : a + _CHUNK_ROWS].detach().double() - mean
            norm[a : a + _CHUNK_ROWS] = torch.linalg.vector_norm(self.rows[a : a + _CHUNK_ROWS, :dim].double(), dim=1)
        g = 1.1 * (2 * dim + 16) * torch.finfo(dtype).eps / 2
        self.sq_norm = (norm * norm).to(dtype)
        self.bound = (g * (norm + norm.max()) ** 2).to(dtype)
        self.dist = torch.full((m,), float("inf"), dtype=dtype, device=z.device)

    def centres(self, index: torch.Tensor) -> torch.Tensor:
        """``(s, dim + 1)`` rows ``[y_c, -|y_c|^2 / 2]`` of the given row indices."""
        c = self.rows[index]
        c[:, -1] = -0.5 * self.sq_norm[index]
        return c

    def apply(self, new: list[int]) -> None:
        """Lower every row's distance to the new centres: one product per tile of rows."""
        c_t = self.centres(torch.tensor(new, device=self.rows.device)).T.contiguous()
        budget = _TILE_BYTES if torch.get_num_threads() == 1 else _PARALLEL_TILE_BYTES
        tile = max(256, budget // (self.rows.element_size() * len(new)))
        for a in range(0, len(self.rows), tile):
            nearest = self.sq_norm[a : a + tile] - 2.0 * (self.rows[a : a + tile] @ c_t).amax(1)
            torch.minimum(self.dist[a : a + tile], nearest, out=self.dist[a : a + tile])


class _ExactDistances:
    """Float64 squared distance of rows to their nearest chosen centre, summed from the
    differences and cached per row (only centres chosen since a row's last visit are added).

    A row-centre value does not depend on which other rows are evaluated with it, so equal rows
    get equal values and ties fall to the lowest index, as in the plain loop.
    """

    def __init__(self, z: torch.Tensor) -> None:
        self.z = z.detach()
        self.value = np.full(len(z), np.inf)
        self.done = np.zeros(len(z), dtype=np.int64)  # centres of `selected` already in `value`

    def argmax(self, rows: np.ndarray, selected: list[int], stats: CoresetStats) -> int:
        """Position in ``rows`` of the row farthest from ``selected`` (lowest row index on ties)."""
        start = int(self.done[rows].min())
        centres = self.z[torch.tensor(selected[start:], device=self.z.device)].double()
        points = self.z[torch.from_numpy(rows).to(self.z.device)].double()
        step = max(1, _EXACT_BYTES // (8 * centres.shape[1] * len(points)))
        for a in range(0, len(centres), step):
            diff = points[:, None, :] - centres[None, a : a + step, :]
            nearest = (diff * diff).sum(-1).amin(1).cpu().numpy()
            self.value[rows] = np.minimum(self.value[rows], nearest)
        self.done[rows] = len(selected)
        stats.exact_pairs += len(rows) * len(centres)
        values = self.value[rows]
        ties = np.flatnonzero(values == values.max())
        return int(ties[np.argmin(rows[ties])])


def _decide(
    rows: np.ndarray,
    dist: np.ndarray,
    bound: np.ndarray,
    exact: _ExactDistances,
    selected: list[int],
    stats: CoresetStats,
) -> int:
    """Position (in ``rows``) of the farthest row, given ``dist`` within ``bound`` of the exact values.

    The caller has checked that every row outside ``rows`` is provably nearer than the best's
    lower bound. Returns the argmax of ``dist`` when no other row's upper bound reaches that lower
    bound, otherwise the exact choice among those that do.
    """
    best = int(np.argmax(dist))
    contenders = np.flatnonzero(dist + bound >= dist[best] - bound[best])
    if contenders.size == 1:
        return best
    stats.exact_decisions += 1
    choice = int(contenders[exact.argmax(rows[contenders], selected, stats)])
    ties = contenders[dist[contenders] == dist[best]]  # the screen's own choice: lowest row of its maxima
    stats.screen_would_differ += choice != int(ties[np.argmin(rows[ties])])
    return choice


def _choose_round(
    screen: _Screen, exact: _ExactDistances, selected: list[int], n_select: int, n_candidates: int, stats: CoresetStats
) -> None:
    """Append to ``selected`` the centres provably chosen among the ``n_candidates`` rows of
    largest upper bound (possibly none)."""
    stats.rounds += 1
    upper = screen.dist + screen.bound
    if n_candidates < len(upper):
        top_values, top = torch.topk(upper, n_candidates + 1)
        outside = float(top_values[-1])  # no row outside the candidates exceeds this
        top = top[:-1]
    else:
        top, outside = torch.arange(len(upper), device=upper.device), -np.inf
    # distances between the candidates (row: centre, column: point), as in _Screen.apply
    pair = (screen.sq_norm[top][None, :] - 2.0 * (screen.centres(top) @ screen.rows[top].T)).cpu().numpy()
    rows = top.cpu().numpy()
    dist = screen.dist[top].cpu().numpy()
    bound = screen.bound[top].cpu().numpy()
    while len(selected) < n_select:
        best = int(np.argmax(dist))
        if not dist[best] - bound[best] > outside:
            return
        choice = _decide(rows, dist, bound, exact, selected, stats)
        selected.append(int(rows[choice]))
        np.minimum(dist, pair[choice], out=dist)


def _choose_one(screen: _Screen, exact: _ExactDistances, selected: list[int], stats: CoresetStats) -> None:
    """Append the next centre when no round could decide one: the contenders among all rows."""
    stats.single_steps += 1
    dist = screen.dist.cpu().numpy()
    bound = screen.bound.cpu().numpy()
    best = int(np.argmax(dist))
    rows = np.flatnonzero(dist + bound >= dist[best] - bound[best])
    selected.append(int(rows[_decide(rows, dist[rows], bound[rows], exact, selected, stats)]))
