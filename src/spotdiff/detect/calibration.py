"""Calibrated decisions: normal-score distribution, normalised score, image and pixel thresholds.

A detector's raw scores (Mahalanobis or nearest-neighbour distances) have no meaning to a person.
After fitting, the model scores held-out normal images (validation images) and keeps:

* the sorted image scores of the normal validation images. The **normal percentile** of an image
  is the fraction of normal validation images whose score is lower than its score (0 = lower than
  every normal validation image, 1 = higher than all of them); the **normalised score**
  (:meth:`Calibration.normalized`) is 0.5 at the image threshold and ranks defects beyond it;
* an image threshold and a pixel threshold (an image is anomalous when its score is > the image
  threshold; a pixel is a defect pixel when its map value is > the pixel threshold), chosen by:

  - ``normal-fpr``: the smallest threshold that flags at most ``target_fpr`` (default 1 %) of the
    normal validation images (pixels, for the pixel threshold);
  - ``f1``: the threshold with the best F1 on normal + anomalous validation images (pixels with
    masks, for the pixel threshold; without masks the pixel threshold falls back to
    ``normal-fpr``);
  - ``manual``: a given value (the pixel threshold then falls back to ``normal-fpr`` unless given).

Everything is stored as ``calibration`` in the model's ``config.json`` (see :class:`Calibration`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from spotdiff.data.loader import ItemDataset, batches
from spotdiff.errors import ConfigError, DataError, SpotdiffError
from spotdiff.progress import progress

THRESHOLD_MODES = ("normal-fpr", "f1", "manual")
DEFAULT_FPR = 0.01
NORMALIZED_FALLBACK = 0.01
"""Spread of :meth:`Calibration.normalized`, as a fraction of ``max(|T|, 1)``, when the normal
validation scores have none (our choice: small, so that the score still moves away from 0.5)."""
PIXEL_QUANTILE_LEVELS = 101
"""Stored quantiles (0 %, 1 %, ..., 100 %) of the normal validation pixel scores, for reference."""
FINE_FPR_IMAGES = 100
"""Below this many normal validation images ``summary`` says how coarse the measured FPR is."""


@dataclass
class Calibration:
    """What the thresholds rest on; JSON-serialisable through ``to_dict`` / ``from_dict``.

    Attributes:
        normal_scores: sorted image scores of the normal validation images.
        image_threshold, pixel_threshold: decision thresholds (score > threshold = anomalous).
        image_mode, pixel_mode: how each was chosen (one of ``THRESHOLD_MODES``).
        target_fpr: the false-positive rate aimed at by ``normal-fpr``.
        pixel_quantiles: ``PIXEL_QUANTILE_LEVELS`` quantiles of the normal validation pixel scores.
        figures: validation figures at the chosen thresholds (counts, FPR, TPR, F1).
        source: how the validation images were chosen (folder or held-out share and seed).
    """

    normal_scores: list[float]
    image_threshold: float
    pixel_threshold: float
    image_mode: str
    pixel_mode: str
    target_fpr: float = DEFAULT_FPR
    pixel_quantiles: list[float] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], where: str = "calibration", error: type[SpotdiffError] = ConfigError
    ) -> Calibration:
        """The calibration stored in ``data``, checked (:meth:`check`); ``error`` is raised, naming ``where``."""
        if not isinstance(data, dict):
            raise error(f"{where}: must be a JSON object, got {type(data).__name__}")
        try:
            cal = cls(**data)
        except TypeError as exc:
            raise error(f"{where}: malformed calibration ({exc})") from exc
        return cal.check(where, error)

    def check(self, where: str = "calibration", error: type[SpotdiffError] = ConfigError) -> Calibration:
        """Self, unless a field has the wrong type or a number is not finite (``error`` naming the field).

        Nothing non-finite may decide: a NaN threshold calls every image normal, NaN normal scores
        make every normalised score 0.
        """

        def bad(name: str, problem: str, value: Any) -> SpotdiffError:
            text = repr(value)
            return error(f"{where}: {name} {problem} (got {text if len(text) <= 60 else text[:57] + '...'})")

        def finite(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("normal_scores", "pixel_quantiles"):
            values = getattr(self, name)
            if not isinstance(values, list) or not all(finite(v) for v in values):
                raise bad(name, "must be a list of finite numbers", values)
        if not self.normal_scores:
            raise error(f"{where}: calibration has no normal validation scores")
        if any(b < a for a, b in zip(self.normal_scores, self.normal_scores[1:])):
            raise bad("normal_scores", "must be sorted in increasing order", self.normal_scores)
        for name in ("image_threshold", "pixel_threshold"):
            if not finite(getattr(self, name)):
                raise bad(name, "must be a finite number", getattr(self, name))
        for name in ("image_mode", "pixel_mode"):
            if getattr(self, name) not in THRESHOLD_MODES:
                raise bad(name, f"must be one of {list(THRESHOLD_MODES)}", getattr(self, name))
        if not finite(self.target_fpr) or not 0.0 <= self.target_fpr < 1.0:
            raise bad("target_fpr", "must be a number in [0, 1)", self.target_fpr)
        for name in ("figures", "source"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "must be a JSON object", getattr(self, name))
        return self

    def percentile(self, scores: np.ndarray | Sequence[float]) -> np.ndarray:
        """Fraction of normal validation images whose score is lower than each of ``scores`` (0 .. 1).

        Saturates at 1 for every score above the highest normal one: it says "above all normal
        images", not how far; see :meth:`normalized` for a score that ranks defects."""
        ref = np.asarray(self.normal_scores, dtype=np.float64)
        values = np.asarray(scores, dtype=np.float64)
        if not np.isfinite(ref).all():  # a damaged calibration ranks nothing: NaN, never 0 or 1
            return np.full(values.shape, np.nan)
        return np.where(np.isfinite(values), np.searchsorted(ref, values, side="left") / ref.size, np.nan)

    def spread(self) -> float:
        """Scale of :meth:`normalized`: the standard deviation of the normal validation scores, or,
        when it is 0 or not finite (one image, equal scores), ``NORMALIZED_FALLBACK * max(|T|, 1)``."""
        ref = np.asarray(self.normal_scores, dtype=np.float64)
        sd = float(ref.std()) if ref.size else 0.0
        return sd if np.isfinite(sd) and sd > 0 else NORMALIZED_FALLBACK * max(abs(float(self.image_threshold)), 1.0)

    def normalized(self, scores: np.ndarray | Sequence[float], threshold: float | None = None) -> np.ndarray:
        """Normalised score in (0, 1): ``0.5 + 0.5 z / (1 + |z|)`` with ``z = (score - T) / spread``.

        ``T`` is ``threshold`` (default: the image threshold), so the normalised score is exactly 0.5
        at the threshold, above 0.5 exactly for anomalous images, strictly increasing in the raw
        score, and never rounds to 1 for any finite score a detector produces (at ``z = 99`` it is
        0.995, at ``z = 999`` 0.9995): defects with different raw scores get different normalised
        scores. A non-finite score, or non-finite normal scores, give NaN. See ``docs/deploy.md``
        ("Normalised score").
        """
        t = float(self.image_threshold if threshold is None else threshold)
        z = (np.asarray(scores, dtype=np.float64) - t) / self.spread()
        if not np.isfinite(np.asarray(self.normal_scores, dtype=np.float64)).all():
            z = np.full(z.shape, np.nan)  # a damaged calibration: NaN, never a made-up spread
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(z), 0.5 + 0.5 * z / (1.0 + np.abs(z)), np.nan)

    def summary(self) -> str:
        """Lines printed by ``spotdiff fit``: thresholds, how chosen, validation figures."""
        f = self.figures
        lines = [
            f"calibration on {f.get('n_val_good', 0)} normal + {f.get('n_val_bad', 0)} anomalous validation "
            f"image(s) ({self.source.get('validation', '?')}):",
            f"  image threshold {self.image_threshold:.6g} ({self.image_mode}"
            + (f", target FPR {self.target_fpr:g}" if self.image_mode == "normal-fpr" else "")
            + "): "
            + _figures_text(f, "image"),
            f"  pixel threshold {self.pixel_threshold:.6g} ({self.pixel_mode}"
            + (f", target FPR {self.target_fpr:g}" if self.pixel_mode == "normal-fpr" else "")
            + "): "
            + _figures_text(f, "pixel"),
        ]
        n = f.get("n_val_good", 0)
        if n and (n < FINE_FPR_IMAGES or 1.0 / n > self.target_fpr):
            lines.append(
                f"  note: {n} normal validation images measure the false-alarm rate in steps of "
                f"{1.0 / n:.3g}; for {1.0 / FINE_FPR_IMAGES:g} steps give {FINE_FPR_IMAGES}+ normal images "
                "(--val-good DIR, or a larger --val-fraction)"
            )
        return "\n".join(lines)


def _figures_text(figures: dict[str, Any], level: str) -> str:
    parts = [f"{k} {figures[f'{level}_{k}']:.4f}" for k in ("fpr", "tpr", "f1") if f"{level}_{k}" in figures]
    return ", ".join(parts) or "no validation figures"


def check_threshold_mode(
    mode: str, have_bad: bool, threshold: float | None, target_fpr: float, pixel_threshold: float | None = None
) -> None:
    """ConfigError when ``mode`` is unknown or lacks what it needs (anomalous images, a value, a valid FPR),
    or a given threshold is not a finite number."""
    if mode not in THRESHOLD_MODES:
        raise ConfigError(f"unknown threshold mode {mode!r}; choose one of {list(THRESHOLD_MODES)}")
    if mode == "f1" and not have_bad:
        raise ConfigError("threshold mode f1 needs anomalous validation images (--val-bad DIR); none were given")
    if mode == "manual" and threshold is None:
        raise ConfigError("threshold mode manual needs a value (--threshold T)")
    if not 0.0 <= target_fpr < 1.0:
        raise ConfigError(f"target false-positive rate must be in [0, 1), got {target_fpr}")
    if threshold is not None:
        check_threshold(threshold, "threshold")
    if pixel_threshold is not None:
        check_threshold(pixel_threshold, "pixel threshold")


def check_threshold(value: Any, name: str = "threshold") -> float:
    """``value`` as a float; :class:`ConfigError` unless it is a finite number (NaN or infinity
    would call every image, or every pixel, normal)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def tail_threshold(values: np.ndarray, fpr: float) -> float:
    """Smallest value ``t`` of ``values`` with at most ``floor(fpr * n)`` values ``> t``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    k = int(np.floor(fpr * v.size + 1e-9))  # 0.29 * 100 is 28.999999999999996 in floating point
    return float(np.partition(v, v.size - 1 - k)[v.size - 1 - k])


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold ``t`` maximising F1 of ``score > t`` (candidates: midpoints of distinct scores)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # last index of each distinct score
    tp_at, pos_at = tp[last], last + 1
    f1 = 2 * tp_at / (pos_at + y.sum())
    best = int(np.argmax(f1))  # first maximum: the highest threshold among equals
    i = last[best]
    return float((s[i] + s[i + 1]) / 2) if i + 1 < s.size else float(s[i] - max(abs(s[i]), 1.0))


def rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """FPR, TPR (when positives exist) and F1 of ``score > threshold``."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    pred = s > threshold
    out = {"fpr": float(pred[~y].mean()) if (~y).any() else 0.0}
    if y.any():
        tp = float((pred & y).sum())
        out["tpr"] = tp / float(y.sum())
        out["f1"] = 2 * tp / float(pred.sum() + y.sum())
    return out


def score_dataset(
    model: Any, dataset: ItemDataset, desc: str = "scoring validation images"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores ``(N,)``, maps ``(N, H, W)`` float32 and masks ``(N, H, W)`` bool of a dataset's items."""
    n_batches = -(-len(dataset) // model.forward_batch)
    scores, maps, masks = [], [], []
    for batch in progress(batches(dataset, model.forward_batch, 0), desc=desc, total=n_batches, unit="batch"):
        images = batch["image"] if isinstance(batch, dict) else batch
        s, m = model.predict(images)
        scores.append(s.numpy())
        maps.append(m.numpy())
        mask = batch.get("mask") if isinstance(batch, dict) else None
        masks.append((mask > 0.5).numpy() if mask is not None else np.zeros(m.shape, bool))
    return np.concatenate(scores), np.concatenate(maps), np.concatenate(masks)


def _check_finite_scores(scores: np.ndarray, maps: np.ndarray, dataset: ItemDataset | None, kind: str) -> None:
    """DataError naming the first validation image whose score or map is NaN or infinite: a
    threshold must never rest on a number that went bad (e.g. a backbone with NaN weights)."""
    if scores.size == 0:
        return
    ok = np.isfinite(scores) & np.isfinite(maps.reshape(maps.shape[0], -1)).all(axis=1)
    if ok.all():
        return
    first = int(np.flatnonzero(~ok)[0])
    paths = getattr(dataset, "paths", None)
    name = str(paths[first]) if paths is not None else f"validation image #{first}"
    raise DataError(
        f"{name}: the model gives a non-finite score or map (NaN or infinity) on this {kind} "
        f"validation image ({int((~ok).sum())} of {ok.size} such images); refusing to calibrate on it"
    )


def calibrate(
    model: Any,
    val_good: ItemDataset,
    val_bad: ItemDataset | None = None,
    mode: str = "normal-fpr",
    target_fpr: float = DEFAULT_FPR,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    source: dict[str, Any] | None = None,
    has_masks: bool = False,
) -> Calibration:
    """Score validation images and choose thresholds (see module docstring); sets ``model.calibration_``.

    ``val_good`` / ``val_bad`` items are dicts with ``image`` (and ``mask`` for ``val_bad``) at the
    model's image size. ``has_masks``: ``val_bad`` carries real masks (pixel F1 is then possible).
    """
    check_threshold_mode(mode, val_bad is not None and len(val_bad) > 0, threshold, target_fpr, pixel_threshold)
    if len(val_good) == 0:
        raise DataError("no normal validation images to calibrate on")
    good_scores, good_maps, _ = score_dataset(model, val_good, "scoring normal validation images")
    bad_scores = np.zeros(0)
    bad_maps = np.zeros((0, *good_maps.shape[1:]), np.float32)
    bad_masks = np.zeros(bad_maps.shape, bool)
    if val_bad is not None and len(val_bad):
        bad_scores, bad_maps, bad_masks = score_dataset(model, val_bad, "scoring anomalous validation images")
    _check_finite_scores(good_scores, good_maps, val_good, "normal")
    _check_finite_scores(bad_scores, bad_maps, val_bad, "anomalous")
    scores = np.concatenate([good_scores, bad_scores])
    labels = np.r_[np.zeros(good_scores.size, bool), np.ones(bad_scores.size, bool)]

    if mode == "manual" and threshold is not None:  # check_threshold_mode: manual has a value
        image_t = float(threshold)
    elif mode == "f1":
        image_t = f1_threshold(scores, labels)
    else:
        image_t = tail_threshold(good_scores, target_fpr)

    pixel_mode = "manual" if pixel_threshold is not None else mode
    masked = has_masks and bool(bad_masks.any())
    if pixel_mode == "f1" and not masked:
        pixel_mode = "normal-fpr"  # no masks: no pixel F1
    if pixel_mode == "manual" and pixel_threshold is None:
        pixel_mode = "normal-fpr"
    if pixel_mode == "manual" and pixel_threshold is not None:
        pixel_t = float(pixel_threshold)
    elif pixel_mode == "f1":
        pixel_t = f1_threshold(
            np.r_[good_maps.ravel(), bad_maps.ravel()], np.r_[np.zeros(good_maps.size, bool), bad_masks.ravel()]
        )
    else:
        pixel_t = tail_threshold(good_maps, target_fpr)

    figures: dict[str, Any] = {"n_val_good": int(good_scores.size), "n_val_bad": int(bad_scores.size)}
    figures.update({f"image_{k}": v for k, v in rates(scores, labels, image_t).items()})
    if masked:
        pix_scores = np.r_[good_maps.ravel(), bad_maps.ravel()]
        pix_labels = np.r_[np.zeros(good_maps.size, bool), bad_masks.ravel()]
    else:
        pix_scores, pix_labels = good_maps.ravel(), np.zeros(good_maps.size, bool)
    figures.update({f"pixel_{k}": v for k, v in rates(pix_scores, pix_labels, pixel_t).items()})
    quantiles = np.quantile(good_maps, np.linspace(0, 1, PIXEL_QUANTILE_LEVELS)).tolist()
    cal = Calibration(
        normal_scores=sorted(float(s) for s in good_scores),
        image_threshold=image_t,
        pixel_threshold=pixel_t,
        image_mode=mode,
        pixel_mode=pixel_mode,
        target_fpr=float(target_fpr),
        pixel_quantiles=quantiles,
        figures=figures,
        source=dict(source or {}),
    ).check("calibration", DataError)
    model.calibration_ = cal.to_dict()
    return cal


def model_calibration(model: Any) -> Calibration | None:
    """The calibration stored on a model (None for models fitted before calibration existed)."""
    data = getattr(model, "calibration_", None)
    return Calibration.from_dict(data) if data else None


def decide(scores: Iterable[Any], threshold: float | None) -> list[str]:
    """``"anomalous"`` (score > threshold) / ``"normal"`` per score; ``"no threshold"`` when ``threshold``
    is None; ``"error"`` for a non-finite score (never ``"normal"``: NaN > T is false)."""
    values = [float(s) for s in scores]
    if threshold is None:
        return ["no threshold" if np.isfinite(v) else "error" for v in values]
    return ["error" if not np.isfinite(v) else "anomalous" if v > threshold else "normal" for v in values]
