"""Exact, fast anomaly-detection metrics under the VisA evaluation protocol.

Image level: one score and one label (0 normal, 1 anomalous) per image.
Pixel level: one anomaly map and one ground-truth mask per image. Following the official VisA
evaluation, the pixels of *all* test images (normal images included) are pooled into one set.

Definitions (``P`` positives, ``N`` negatives, a sample is predicted anomalous when ``score >= t``):

``*_auroc``
    Area under the ROC curve (FPR, TPR) over every distinct threshold, by the trapezoidal rule;
    equals ``sklearn.metrics.roc_auc_score`` (ties count one half).
``*_aupr``
    Trapezoidal area under the exact precision-recall curve:
    ``sklearn.metrics.auc(recall, precision)`` with ``precision, recall, _ =
    sklearn.metrics.precision_recall_curve(labels, scores)`` (the curve starts at recall 0,
    precision 1). This is the paper's AU-PR.
``*_ap``
    Step-wise average precision ``sum_j (R_j - R_{j-1}) * P_j``; equals
    ``sklearn.metrics.average_precision_score``.
``pixel_aupro``
    Per-region overlap (MVTec AD convention). Regions are the 8-connected components of each
    mask (``scipy.ndimage.label``). At a threshold ``t``, PRO(t) is the mean over all regions of
    the fraction of the region's pixels with ``score >= t``, and FPR(t) is the fraction of
    normal pixels (pixels of any image where the mask is 0) with ``score >= t``. The PRO-vs-FPR
    curve is integrated by the trapezoidal rule from FPR 0 up to FPR 0.3 (interpolating at
    exactly 0.3) and divided by 0.3.

All values are exact (no threshold binning). The pixel-level computation never sorts the pixels:
the ROC, PR and PRO curves only change direction at the distinct scores of *positive* pixels
(between two of them only false positives accrue), so it is enough to sort the few positive
scores and to count, for each of them, the negatives scoring ``>=`` and ``>`` it. Those counts
come from one streaming histogram of every float32 score over a monotone bucketing; the few pixels
that share a bucket with a positive score are compared exactly.
Anomaly maps are evaluated as float32 (float64 maps are rounded to float32 on input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
from scipy import ndimage

__all__ = ["Evaluator", "evaluate", "pr_curve", "roc_curve", "PRO_FPR_LIMIT"]

PRO_FPR_LIMIT = 0.3
"""Upper FPR limit of the AU-PRO integral (MVTec AD / VisA convention)."""

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_BLOCK_PIXELS = 1 << 18  # pixels per streaming block: temporaries stay small and are reused
_MAX_BUCKET_BITS = 22  # at most 4 Mi histogram buckets (16 MiB of int32 counts)

_PIXEL_KEYS = ("pixel_auroc", "pixel_aupr", "pixel_ap", "pixel_aupro")

ImageArray = Any  # numpy array, torch tensor or nested sequence


# ---------------------------------------------------------------------------------------------
# Input conversion and validation
# ---------------------------------------------------------------------------------------------


def _to_numpy(x: ImageArray) -> np.ndarray:
    """A numpy view (or copy) of a numpy array, a torch tensor (any device) or a sequence."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        t = x.detach().cpu()
        if not t.dtype.is_floating_point or t.dtype.itemsize >= 4:
            return t.numpy()
        return t.float().numpy()  # float16 / bfloat16: exact in float32
    return np.asarray(x)


def _check_finite(a: np.ndarray, name: str) -> None:
    """ValueError when ``a`` holds NaN or +-inf (min/max propagate NaN; no large temporaries)."""
    if a.size == 0:
        return
    lo, hi = a.min(), a.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = "NaN" if (np.isnan(lo) or np.isnan(hi)) else "infinite values"
        raise ValueError(f"{name} contains {bad}; scores must be finite")


def _as_scores(x: ImageArray, name: str) -> np.ndarray:
    """Validated 1-D float64 scores."""
    a = _to_numpy(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per image), got shape {a.shape}")
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    _check_finite(a, name)
    return a


def _as_binary(x: ImageArray, name: str) -> np.ndarray:
    """Validated boolean array from bool, {0, 1} or {0, 255} values (any numeric dtype)."""
    a = _to_numpy(x)
    if a.dtype == bool:
        return a
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ValueError(f"{name} must be boolean or numeric, got dtype {a.dtype}")
    if a.size == 0:
        return np.zeros(a.shape, dtype=bool)
    top = a.max()
    n_nonzero = np.count_nonzero(a)
    if top not in (0, 1, 255) or (n_nonzero and np.count_nonzero(a == top) != n_nonzero):
        found = np.unique(a)  # error path only
        shown = ", ".join(f"{v:g}" for v in found[:6]) + (", ..." if found.size > 6 else "")
        raise ValueError(f"{name} must be binary: bool, or values in {{0, 1}} or in {{0, 255}}; found {shown}")
    return a != 0


def _as_maps(x: ImageArray, name: str) -> np.ndarray:
    """Validated C-contiguous float32 maps of shape (n, H, W); (n, 1, H, W) is squeezed."""
    a = _to_numpy(x)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape (n, H, W) or (n, 1, H, W), got {a.shape}")
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
    _check_finite(a, name)
    single = np.ascontiguousarray(a, dtype=np.float32)
    if single is not a:
        _check_finite(single, f"{name} converted to float32 (values beyond +-3.4e38)")
    return single


def _as_masks(x: ImageArray, name: str) -> np.ndarray:
    """Validated C-contiguous bool masks of shape (n, H, W); (n, 1, H, W) is squeezed."""
    a = _to_numpy(x)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape (n, H, W) or (n, 1, H, W), got {a.shape}")
    return np.ascontiguousarray(_as_binary(a, name))


def _check_two_classes(labels: np.ndarray, what: str) -> None:
    n_pos = int(np.count_nonzero(labels))
    if n_pos == 0 or n_pos == labels.size:
        only = "anomalous" if n_pos else "normal"
        raise ValueError(
            f"{what}: only {only} samples ({labels.size} in total); "
            "AU-ROC / AU-PR / AP need both normal and anomalous samples"
        )


# ---------------------------------------------------------------------------------------------
# Curves at the distinct positive scores
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Vertices:
    """Confusion counts at the distinct positive scores ``u_1 > u_2 > ... > u_K``.

    ``tp[j]`` positives with score >= u_j; ``fp_ge[j]`` / ``fp_gt[j]`` negatives with
    score >= u_j / > u_j; ``pro[j]`` mean region overlap at u_j (pixel level only).
    """

    tp: np.ndarray
    fp_ge: np.ndarray
    fp_gt: np.ndarray
    n_pos: int
    n_neg: int
    pro: np.ndarray | None = None


@overload
def _distinct_descending(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
@overload
def _distinct_descending(values: np.ndarray, weights: None = None) -> tuple[np.ndarray, np.ndarray, None]: ...
def _distinct_descending(
    values: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Distinct values (descending), how many values are >= each, and the weight sum of those."""
    if weights is None:
        ordered = np.sort(values)[::-1]
        weight_sums = None
    else:
        order = np.argsort(values)[::-1]
        ordered = values[order]
        weight_sums = np.cumsum(weights[order])
    last = np.flatnonzero(ordered[1:] != ordered[:-1])
    last = np.append(last, ordered.size - 1)  # last index of each distinct value
    counts_ge = last + 1
    return ordered[last], counts_ge, None if weight_sums is None else weight_sums[last]


def _interleave(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    out = np.empty(2 * first.size, dtype=np.float64)
    out[0::2] = first
    out[1::2] = second
    return out


def _fpr_axis(v: _Vertices) -> np.ndarray:
    """FPR at (0,0), then per positive score: just above it (fp_gt) and at it (fp_ge), then 1."""
    return np.concatenate(([0.0], _interleave(v.fp_gt, v.fp_ge), [v.n_neg])) / v.n_neg


def _previous(a: np.ndarray, first: float) -> np.ndarray:
    return np.concatenate(([first], a[:-1]))


def _auroc(v: _Vertices) -> float:
    tpr = np.concatenate(([0.0], _interleave(_previous(v.tp, 0), v.tp), [v.n_pos])) / v.n_pos
    return float(np.trapezoid(tpr, _fpr_axis(v)))


def _aupr(v: _Vertices) -> float:
    recall = v.tp / v.n_pos
    precision = v.tp / (v.tp + v.fp_ge)
    tp_before = _previous(v.tp, 0)
    # precision just above u_j: positives > u_j are tp_before, negatives > u_j are fp_gt
    with np.errstate(invalid="ignore", divide="ignore"):
        precision_before = tp_before / (tp_before + v.fp_gt)
    if v.fp_gt[0] == 0:  # nothing scores above u_1: the curve starts at (0, 1)
        precision_before[0] = 1.0
    x = np.concatenate(([0.0], _interleave(_previous(recall, 0.0), recall)))
    y = np.concatenate(([1.0], _interleave(precision_before, precision)))
    return float(np.trapezoid(y, x))


def _ap(v: _Vertices) -> float:
    recall = v.tp / v.n_pos
    precision = v.tp / (v.tp + v.fp_ge)
    return float(max(0.0, np.sum(np.diff(recall, prepend=0.0) * precision)))


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under the polyline (x non-decreasing) for x in [x[0], limit]."""
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    x1_clipped = np.minimum(x1, limit)
    width = np.maximum(x1_clipped - x0, 0.0)
    dx = x1 - x0
    fraction = np.divide(x1_clipped - x0, dx, out=np.ones_like(dx), where=dx > 0)
    y1_clipped = y0 + (y1 - y0) * fraction  # interpolated at `limit` on the crossing segment
    return float(np.sum(width * (y0 + y1_clipped) / 2.0))


def _aupro(v: _Vertices, limit: float = PRO_FPR_LIMIT) -> float:
    assert v.pro is not None
    pro = np.concatenate(([0.0], _interleave(_previous(v.pro, 0.0), v.pro), [v.pro[-1]]))
    return _area_up_to(_fpr_axis(v), pro, limit) / limit


def _curve_metrics(v: _Vertices, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_auroc": _auroc(v), f"{prefix}_aupr": _aupr(v), f"{prefix}_ap": _ap(v)}
    if v.pro is not None:
        out[f"{prefix}_aupro"] = _aupro(v)
    return out


def _sample_vertices(scores: np.ndarray, labels: np.ndarray) -> _Vertices:
    """Vertices for a modest number of samples (image level): sort the negatives."""
    thresholds, tp, _ = _distinct_descending(scores[labels])
    negatives = np.sort(scores[~labels])
    n_neg = negatives.size
    fp_ge = n_neg - np.searchsorted(negatives, thresholds, side="left")
    fp_gt = n_neg - np.searchsorted(negatives, thresholds, side="right")
    return _Vertices(tp, fp_ge, fp_gt, int(tp[-1]), int(n_neg))


# ---------------------------------------------------------------------------------------------
# Pixel level: streaming counts over all pixels, never sorting them
# ---------------------------------------------------------------------------------------------


class _Buckets:
    """A monotone map of float32 scores to ``n_buckets`` integer buckets.

    ``bucket(x) = trunc(clip((x - low) * scale, -1, width + 1)) + 1``, evaluated with the same
    float32 operations for pixels and thresholds. Every step is monotone non-decreasing, so
    ``bucket(a) < bucket(b)`` implies ``a < b``: a bucket that holds no threshold lies entirely
    between two consecutive thresholds. Bucket 0 holds scores below ``low``, the last one
    scores far above ``low + width / scale``.
    """

    def __init__(self, low: float, high: float, width: int) -> None:
        self.low = np.float32(low)
        span = float(high) - float(low)
        self.scale = np.float32(min(width / span, 1e30) if span > 0 else 1.0)
        self.top = np.float32(width + 1)
        self.n_buckets = width + 3

    def __call__(self, x: np.ndarray, scratch: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Bucket of each float32 value in ``x`` into ``out`` (intp, ``x``'s size)."""
        with np.errstate(over="ignore"):  # +-inf is clipped like any far score
            y = np.subtract(x, self.low, out=scratch)
            np.multiply(y, self.scale, out=y)
        np.clip(y, np.float32(-1.0), self.top, out=y)
        np.copyto(out, y, casting="unsafe")  # truncation toward zero
        np.add(out, 1, out=out)
        return out


def _count_pixels(blocks: Sequence[np.ndarray]) -> int:
    return sum(block.size for block in blocks)


def _all_pixel_counts(
    blocks: Sequence[np.ndarray], thresholds: np.ndarray, bucket_bits: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Numbers of pixels scoring >= and > each threshold, streaming over float32 blocks.

    thresholds: distinct float32 values, descending. Pixels are counted per bucket of a
    monotone bucketing of [min, max] threshold (:class:`_Buckets`): every pixel of a higher
    bucket than t's is > t, every pixel of a lower one < t. The pixels sharing a bucket with
    a threshold (a few percent) are compared with it; the pixels of the rare buckets holding
    several thresholds are kept and sorted. Returns (count_ge, count_gt, n_pixels).
    """
    k = thresholds.size
    if bucket_bits is None:  # about one bucket per 8 pixels, 1 Ki to 4 Mi buckets
        bucket_bits = min(_MAX_BUCKET_BITS, max(10, _count_pixels(blocks).bit_length() - 3))
    bucketing = _Buckets(thresholds[-1], thresholds[0], 1 << bucket_bits)
    t_buckets = bucketing(thresholds, np.empty(k, np.float32), np.empty(k, np.intp))
    n_buckets = bucketing.n_buckets
    # int32 halves the cache misses of the scattered increments; one spare bucket at the end,
    # never hit, for the suffix sums
    count_dtype = np.int32 if _count_pixels(blocks) < 2**31 else np.int64
    hist = np.zeros(n_buckets + 1, dtype=count_dtype)
    one = count_dtype(1)  # same dtype as hist: np.add.at's fast path
    # per bucket: how many thresholds (0, 1, or 2 for several), and the one threshold's index
    hot, first, per_bucket = np.unique(t_buckets, return_index=True, return_counts=True)
    kind = np.zeros(n_buckets, dtype=np.uint8)
    kind[hot] = np.minimum(per_bucket, 2)
    any_crowded = bool(per_bucket.max() > 1)
    threshold_of_bucket = np.zeros(n_buckets, dtype=np.int32)
    threshold_of_bucket[hot] = first
    # per threshold alone in its bucket: the pixels of its bucket that are >= / > it
    own_ge = np.zeros(k, dtype=np.int64)
    own_gt = np.zeros(k, dtype=np.int64)
    crowded: list[np.ndarray] = []  # pixels of buckets holding several thresholds
    n_pixels = 0
    block_pixels = min(_BLOCK_PIXELS, max(block.size for block in blocks))
    scratch = np.empty(block_pixels, np.float32)
    buckets = np.empty(block_pixels, np.intp)  # intp: no index conversion in add.at / take
    for block in blocks:
        flat = block.reshape(-1)
        for start in range(0, flat.size, block_pixels):
            x = flat[start : start + block_pixels]
            n = x.size
            b = bucketing(x, scratch[:n], buckets[:n])
            np.add.at(hist, b, one)
            kind_of_pixel = np.take(kind, b, mode="clip")
            single = (kind_of_pixel == 1) if any_crowded else kind_of_pixel.view(bool)
            x_single = x[single]
            j = np.take(threshold_of_bucket, b[single], mode="clip")
            t = np.take(thresholds, j, mode="clip")
            np.add.at(own_ge, j[x_single >= t], 1)
            np.add.at(own_gt, j[x_single > t], 1)
            if any_crowded:
                crowded.append(x[kind_of_pixel == 2])
            n_pixels += n
    above = hist[::-1]
    np.cumsum(above, out=above)  # in place: hist[b] = pixels in buckets >= b
    in_higher_buckets = hist[t_buckets + 1]
    several = np.flatnonzero(kind[t_buckets] == 2)
    if several.size:
        own_ge[several], own_gt[several] = _counts_in_crowded_buckets(
            np.concatenate(crowded), thresholds[several], t_buckets[several], bucketing
        )
    return in_higher_buckets + own_ge, in_higher_buckets + own_gt, n_pixels


def _counts_in_crowded_buckets(
    values: np.ndarray, thresholds: np.ndarray, t_buckets: np.ndarray, bucketing: _Buckets
) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold: the values of its own bucket that are >= it and > it.

    values: every pixel of the buckets holding several thresholds. Once sorted, their buckets
    ascend too (monotone bucketing), so each bucket is a contiguous run.
    """
    values = np.sort(values)
    v_buckets = bucketing(values, np.empty(values.size, np.float32), np.empty(values.size, np.intp))
    bucket_end = np.searchsorted(v_buckets, t_buckets, side="right")
    own_ge = bucket_end - np.searchsorted(values, thresholds, side="left")
    own_gt = bucket_end - np.searchsorted(values, thresholds, side="right")
    return own_ge, own_gt


def _positive_pixels(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores of mask pixels, their weight 1/|region| and the number of regions.

    Regions are the 8-connected components of each image's mask.
    """
    flat_masks = masks.reshape(masks.shape[0], -1)
    scores: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    n_regions = 0
    for i in np.flatnonzero(flat_masks.any(axis=1)):
        regions, n = ndimage.label(masks[i], structure=_EIGHT_CONNECTED)
        region_of_pixel = regions[masks[i]]
        sizes = np.bincount(region_of_pixel)
        scores.append(maps[i][masks[i]])
        weights.append(1.0 / sizes[region_of_pixel])
        n_regions += n
    if not scores:
        return np.empty(0, np.float32), np.empty(0), 0
    return np.concatenate(scores), np.concatenate(weights), n_regions


def _pixel_vertices(stacks: Sequence[tuple[np.ndarray, np.ndarray]], bucket_bits: int | None = None) -> _Vertices:
    """Vertices (with PRO) for all pixels of (maps, masks) stacks: float32 / bool (n, H, W)."""
    parts = [_positive_pixels(maps, masks) for maps, masks in stacks]
    pos_scores = np.concatenate([p[0] for p in parts])
    pos_weights = np.concatenate([p[1] for p in parts])
    n_regions = sum(p[2] for p in parts)
    n_all = sum(maps.size for maps, _ in stacks)
    if pos_scores.size == 0 or pos_scores.size == n_all:
        only = "normal (mask 0)" if pos_scores.size == 0 else "anomalous (mask 1)"
        raise ValueError(f"masks: all {n_all} pixels are {only}; pixel metrics need both normal and anomalous pixels")
    thresholds, tp, weight_ge = _distinct_descending(pos_scores, pos_weights)
    count_ge, count_gt, n_pixels = _all_pixel_counts([maps for maps, _ in stacks], thresholds, bucket_bits)
    fp_ge = count_ge - tp
    fp_gt = count_gt - _previous(tp, 0)  # positives > u_j are those >= u_{j-1}
    return _Vertices(tp, fp_ge, fp_gt, int(tp[-1]), n_pixels - int(tp[-1]), pro=weight_ge / n_regions)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _binary_curve(scores: ImageArray, labels: ImageArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fps, tps, thresholds) at every distinct score, descending (scikit-learn's convention)."""
    s = _to_numpy(scores).reshape(-1)
    y = _as_binary(labels, "labels").reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    if s.dtype == bool or not np.issubdtype(s.dtype, np.number):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    _check_finite(s, "scores")
    _check_two_classes(y, "labels")
    order = np.argsort(s, kind="stable")[::-1]
    s = s[order]
    last = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)
    tps = np.cumsum(y[order], dtype=np.float64)[last]
    fps = 1.0 + last - tps
    return fps, tps, s[last]


def pr_curve(scores: ImageArray, labels: ImageArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact precision-recall curve: ``(precision, recall, thresholds)``.

    Same points and conventions as ``sklearn.metrics.precision_recall_curve``: one point per
    distinct score (``score >= threshold`` is positive), ordered by increasing threshold, with a
    final point (precision 1, recall 0) that has no threshold. ``auc(recall, precision)`` of
    this curve is ``*_aupr``. Scores: any shape (flattened, e.g. anomaly maps); labels: bool,
    {0, 1} or {0, 255}. Sorts all scores: meant for plots, not for the 30-million-pixel
    metric computation (see :func:`evaluate`).

    Raises:
        ValueError: sizes differ, non-finite scores, non-binary labels or only one class.
    """
    fps, tps, thresholds = _binary_curve(scores, labels)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return (np.append(precision[::-1], 1.0), np.append(recall[::-1], 0.0), thresholds[::-1])


def roc_curve(scores: ImageArray, labels: ImageArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC curve: ``(fpr, tpr, thresholds)``, decreasing thresholds.

    Same points as ``sklearn.metrics.roc_curve`` (``drop_intermediate=True``): one point per
    distinct score minus points collinear with their neighbours (they do not change the area),
    preceded by (0, 0) at threshold ``inf``. Its trapezoidal area is ``*_auroc``.
    """
    fps, tps, thresholds = _binary_curve(scores, labels)
    if fps.size > 2:
        corner = np.logical_or(np.diff(fps, 2), np.diff(tps, 2))
        keep = np.flatnonzero(np.concatenate(([True], corner, [True])))
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps = np.append(0.0, fps)
    tps = np.append(0.0, tps)
    thresholds = np.append(np.inf, thresholds.astype(np.float64))
    return fps / fps[-1], tps / tps[-1], thresholds


class Evaluator:
    """Accumulates per-batch scores (and maps/masks), then computes every metric exactly.

    ``update`` validates and stores a copy of each batch: image scores as float64, maps as
    float32, masks as bool (4 + 1 bytes per pixel). ``compute`` returns the same dict as
    :func:`evaluate`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every stored batch."""
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._stacks: list[tuple[np.ndarray, np.ndarray]] = []
        self._types: list[str] = []
        self._with_maps: bool | None = None
        self._with_types: bool | None = None

    def update(
        self,
        image_scores: ImageArray,
        image_labels: ImageArray,
        anomaly_maps: ImageArray | None = None,
        masks: ImageArray | None = None,
        defect_types: Sequence[str] | None = None,
    ) -> None:
        """Add one batch. Shapes: scores/labels (n,), maps/masks (n, H, W) or (n, 1, H, W).

        Every batch must give maps and masks, or none; defect types likewise.
        """
        batch = _validate(image_scores, image_labels, anomaly_maps, masks, defect_types, copy=True)
        scores, labels, stack, types = batch
        with_maps, with_types = stack is not None, types is not None
        if self._with_maps is not None and (with_maps, with_types) != (self._with_maps, self._with_types):
            raise ValueError(
                "every update must give the same inputs: anomaly_maps/masks "
                f"{'always' if self._with_maps else 'never'}, defect_types "
                f"{'always' if self._with_types else 'never'}"
            )
        self._with_maps, self._with_types = with_maps, with_types
        self._scores.append(scores)
        self._labels.append(labels)
        if stack is not None:
            self._stacks.append(stack)
        if types is not None:
            self._types.extend(types)

    def compute(self) -> dict[str, Any]:
        """All metrics over every stored batch (see :func:`evaluate` for the keys)."""
        if not self._scores:
            raise ValueError("Evaluator.compute() called before any update()")
        return _compute(
            np.concatenate(self._scores),
            np.concatenate(self._labels),
            self._stacks if self._with_maps else None,
            self._types if self._with_types else None,
        )


def _validate(
    image_scores: ImageArray,
    image_labels: ImageArray,
    anomaly_maps: ImageArray | None,
    masks: ImageArray | None,
    defect_types: Sequence[str] | None,
    copy: bool,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None, list[str] | None]:
    scores = _as_scores(image_scores, "image_scores")
    labels = _as_binary(image_labels, "image_labels")
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"image_scores and image_labels must have the same 1-D shape, got {scores.shape} and {labels.shape}"
        )
    if copy:  # the caller may reuse its buffers after update()
        scores, labels = scores.copy(), labels.copy()
    stack = None
    if (anomaly_maps is None) != (masks is None):
        raise ValueError("give both anomaly_maps and masks for pixel metrics, or neither")
    if anomaly_maps is not None:
        maps_arr = _as_maps(anomaly_maps, "anomaly_maps")
        masks_arr = _as_masks(masks, "masks")
        if maps_arr.shape != masks_arr.shape:
            raise ValueError(f"anomaly_maps and masks differ in shape: {maps_arr.shape} vs {masks_arr.shape}")
        if maps_arr.shape[0] != scores.size:
            raise ValueError(f"{maps_arr.shape[0]} anomaly maps for {scores.size} image scores")
        if copy:
            maps_arr = maps_arr.copy() if np.may_share_memory(maps_arr, _to_numpy(anomaly_maps)) else maps_arr
            masks_arr = masks_arr.copy() if np.may_share_memory(masks_arr, _to_numpy(masks)) else masks_arr
        stack = (maps_arr, masks_arr)
    types = None
    if defect_types is not None:
        types = [str(t) for t in defect_types]
        if len(types) != scores.size:
            raise ValueError(f"{len(types)} defect types for {scores.size} image scores")
    return scores, labels, stack, types


def _select(stacks: Sequence[tuple[np.ndarray, np.ndarray]], keep: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The images flagged in ``keep`` (over all stacks, in order) as views: runs of
    consecutive images are sliced, nothing is copied."""
    out = []
    offset = 0
    for maps, masks in stacks:
        sel = keep[offset : offset + maps.shape[0]].astype(np.int8)
        offset += maps.shape[0]
        edges = np.diff(sel, prepend=0, append=0)
        for start, stop in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
            out.append((maps[start:stop], masks[start:stop]))
    return out


def _compute(
    scores: np.ndarray,
    labels: np.ndarray,
    stacks: Sequence[tuple[np.ndarray, np.ndarray]] | None,
    defect_types: Sequence[str] | None,
) -> dict[str, Any]:
    _check_two_classes(labels, "image_labels")
    result: dict[str, Any] = _curve_metrics(_sample_vertices(scores, labels), "image")
    if stacks is not None:
        result.update(_curve_metrics(_pixel_vertices(stacks), "pixel"))
    if defect_types is not None:
        types = np.asarray(defect_types, dtype=object)
        per_type: dict[str, dict[str, float]] = {}
        for name in sorted(set(types[labels])):
            keep = ~labels | (labels & (types == name))
            entry = _curve_metrics(_sample_vertices(scores[keep], labels[keep]), "image")
            if stacks is not None:
                selected = _select(stacks, keep)
                if any(masks.any() for _, masks in selected):
                    entry.update(_curve_metrics(_pixel_vertices(selected), "pixel"))
                else:  # e.g. the defects vanished when the masks were resized: undefined
                    entry.update(dict.fromkeys(_PIXEL_KEYS, float("nan")))
            per_type[name] = entry
        result["per_defect_type"] = per_type
    return result


def evaluate(
    image_scores: ImageArray,
    image_labels: ImageArray,
    anomaly_maps: ImageArray | None = None,
    masks: ImageArray | None = None,
    defect_types: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Image- and pixel-level metrics under the VisA protocol, exact.

    Args:
        image_scores: (n,) anomaly score per image, higher = more anomalous.
        image_labels: (n,) 0/False normal, 1/True anomalous.
        anomaly_maps: (n, H, W) or (n, 1, H, W) per-pixel scores (evaluated as float32).
        masks: same shape; bool, {0, 1} or {0, 255}. Pixels of every image (normal ones too)
            are pooled; regions for AU-PRO are 8-connected components per image.
        defect_types: (n,) defect type per image; ignored for normal images.

    Returns:
        ``image_auroc, image_aupr, image_ap`` and, with maps and masks, ``pixel_auroc,
        pixel_aupr, pixel_ap, pixel_aupro`` (floats; definitions in the module docstring).
        With ``defect_types`` also ``per_defect_type: {type: {same keys}}``, each type's
        anomalous images against all normal images; a type whose images have no mask pixel
        gets NaN pixel metrics (undefined).

    Raises:
        ValueError: shape mismatch, NaN/inf scores or maps, non-binary masks or labels, or only
            one class (images, or pixels over all images).
    """
    scores, labels, stack, types = _validate(image_scores, image_labels, anomaly_maps, masks, defect_types, copy=False)
    return _compute(scores, labels, None if stack is None else [stack], types)
