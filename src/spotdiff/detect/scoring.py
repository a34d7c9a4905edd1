"""The per-image path of ``predict`` (and of any other front end): decode → resize → model batch →
score and map → decision, as an importable API.

:class:`ImageScorer` holds a fitted model (a :class:`~spotdiff.detect.base.Detector` or an
:class:`~spotdiff.detect.export.OnnxDetector`: anything with ``predict(images) -> (scores, maps)``,
``image_size_`` and ``calibration_``) and the thresholds in effect. Use it in three steps, or all at
once with :meth:`ImageScorer.scored_batches`::

    scorer = ImageScorer(model)                       # thresholds from the model's calibration
    items = [scorer.decode(p) for p in paths]         # thread-safe; a bad file is an error item
    for result in scorer.score_batch(items):          # one model call for the batch
        print(result.path, result.score, result.normalized_score, result.decision)

Fail closed: an image that cannot be decoded, or whose score or map is not finite (NaN, inf), is a
:class:`ScoredImage` with ``decision == "error"`` and an ``error`` message; it is never ``normal``.
The other images of its batch are scored as usual.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spotdiff.errors import ConfigError, DataError

ERROR = "error"
"""The decision of an image that could not be scored (unreadable, or a non-finite score or map)."""


@dataclass
class DecodedImage:
    """One input after decoding: ``pixels`` ``(3, h, w)`` float32 array in [0, 1] at the model's size
    (:func:`spotdiff.data.io.image_to_array`, the decoder of every path);
    ``display`` ``(H', W', 3)`` uint8, the original at :func:`display_size` (None unless asked for);
    ``original_size`` ``(H, W)`` of the file. ``error`` is set (and the rest None) for a bad file."""

    path: Path
    pixels: np.ndarray | None = None
    display: np.ndarray | None = None
    original_size: tuple[int, int] | None = None
    error: str = ""


@dataclass
class ScoredImage:
    """One scored input. ``score`` is the raw image score (model units); ``normalized_score``
    (:meth:`~spotdiff.detect.calibration.Calibration.normalized`, 0.5 at the threshold) and
    ``normal_percentile`` (fraction of normal validation images scoring lower) are None without a
    calibration; ``decision`` is ``anomalous`` / ``normal`` / ``no threshold`` / ``error``;
    ``anomaly_map`` ``(h, w)`` float32 at the model's size; ``display`` and ``original_size`` as in
    :class:`DecodedImage`."""

    path: Path
    score: float | None
    decision: str
    normalized_score: float | None = None
    normal_percentile: float | None = None
    anomaly_map: np.ndarray | None = None
    display: np.ndarray | None = None
    original_size: tuple[int, int] | None = None
    error: str = ""


def display_size(original: tuple[int, int], model: tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` of the original image in an overlay: native aspect, scaled so that both sides are at
    least the model's (``max(model_h / H, model_w / W)``; an original smaller than the model is enlarged)."""
    h, w = original
    s = max(model[0] / h, model[1] / w)
    return max(1, round(h * s)), max(1, round(w * s))


def finite_threshold(value: float | None, name: str) -> float | None:
    """``value`` as a float, or ConfigError naming ``name`` when it is NaN or infinite (None passes)."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return v


class ImageScorer:
    """Scores images with ``model`` at the thresholds in effect (see the module docstring).

    Args:
        model: a fitted detector or ONNX runner.
        threshold, pixel_threshold: override the model's calibrated thresholds (finite numbers).
        keep_display: decode the original image at :func:`display_size` too (for overlays).
    """

    def __init__(
        self,
        model: Any,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        keep_display: bool = False,
    ) -> None:
        from spotdiff.detect.calibration import model_calibration

        if getattr(model, "image_size_", None) is None:
            raise ConfigError(f"{type(model).__name__} is not fitted; fit or load it first")
        self.model = model
        self.calibration = model_calibration(model)
        cal = self.calibration
        self.threshold = (
            finite_threshold(threshold, "--threshold")
            if threshold is not None
            else (finite_threshold(cal.image_threshold, "calibration image_threshold") if cal else None)
        )
        self.pixel_threshold = (
            finite_threshold(pixel_threshold, "--pixel-threshold")
            if pixel_threshold is not None
            else (finite_threshold(cal.pixel_threshold, "calibration pixel_threshold") if cal else None)
        )
        self.image_size: tuple[int, int] = (int(model.image_size_[0]), int(model.image_size_[1]))
        self.keep_display = keep_display
        self.takes_arrays = bool(getattr(model, "takes_arrays", False))

    def decode(self, path: str | os.PathLike[str]) -> DecodedImage:
        """Read ``path`` (any mode; see :func:`spotdiff.data.io.load_image`), resize it to the model's
        size; thread-safe. An unreadable file gives an item with ``error`` set, never an exception."""
        from spotdiff.data.io import load_image

        path = Path(path)
        try:
            return self.decode_image(load_image(path), path)
        except (DataError, OSError) as exc:
            return DecodedImage(path, error=str(exc) if isinstance(exc, DataError) else f"{path}: {exc}")
        except Exception as exc:  # a decoding worker that died (out of memory, a library bug): end the run
            raise DataError(f"{path}: decoding failed ({type(exc).__name__}: {exc}); the run stops") from exc

    def decode_image(self, image: Any, path: str | os.PathLike[str] = "<image>") -> DecodedImage:
        """:meth:`decode` of an already opened 8-bit RGB PIL image (e.g. an upload); ``path`` names it.

        Raises:
            ImageTooLarge: with ``keep_display``, an aspect ratio so extreme that the overlay's
                original (at :func:`display_size`) would exceed ``MAX_IMAGE_PIXELS`` (an error row in predict).
        """
        from PIL import Image

        from spotdiff.data.io import MAX_IMAGE_PIXELS, ImageTooLarge, image_to_array

        original = (image.height, image.width)
        display = None
        if self.keep_display:
            dh, dw = display_size(original, self.image_size)
            if dh * dw > MAX_IMAGE_PIXELS:  # a thin strip enlarged to the model's size on both sides
                raise ImageTooLarge(
                    f"{path}: image of {image.width}x{image.height} pixels would be shown at {dw}x{dh} in its "
                    f"overlay, beyond the limit of {MAX_IMAGE_PIXELS} pixels (extreme aspect ratio); "
                    "score it without overlays (--no-overlays)"
                )
            shown = image if (dh, dw) == original else image.resize((dw, dh), Image.Resampling.BILINEAR)
            display = np.asarray(shown, dtype=np.uint8)
        return DecodedImage(Path(path), image_to_array(image, self.image_size), display, original)

    def score_batch(self, items: Sequence[DecodedImage]) -> list[ScoredImage]:
        """Run the model once on the decodable ``items`` and decide each; order kept, one result per item."""
        good = [i for i, item in enumerate(items) if not item.error and item.pixels is not None]
        results: list[ScoredImage | None] = [None] * len(items)
        for i, item in enumerate(items):
            if item.error or item.pixels is None:
                results[i] = ScoredImage(item.path, None, ERROR, error=item.error or "not decoded")
        if good:
            batch = np.stack([p for i in good if (p := items[i].pixels) is not None])
            if self.takes_arrays:  # the torch-free ONNX runner
                scores, maps = self.model.predict(batch)
            else:
                import torch

                score_tensor, map_tensor = self.model.predict(torch.from_numpy(batch))
                scores, maps = score_tensor.detach().cpu().numpy(), map_tensor.detach().cpu().numpy()
            score_values = np.asarray(scores, np.float64)
            map_values = np.asarray(maps)
            for j, i in enumerate(good):
                results[i] = self._decide(items[i], float(score_values[j]), map_values[j])
        return [r for r in results if r is not None]

    def _decide(self, item: DecodedImage, score: float, amap: np.ndarray) -> ScoredImage:
        """A result from one image's raw score and map: error when either is not finite, else the
        decision of :func:`spotdiff.detect.calibration.decide`."""
        from spotdiff.detect.calibration import decide

        if not math.isfinite(score) or not np.isfinite(amap).all():
            bad = "score" if not math.isfinite(score) else "anomaly map"
            return ScoredImage(
                item.path,
                None,
                ERROR,
                original_size=item.original_size,
                error=f"{item.path}: the model gave a non-finite {bad} (score {score}); "
                "not scored (check the model: spotdiff test)",
            )
        decision = decide([score], self.threshold)[0]
        normalized = percentile = None
        if self.calibration is not None:
            normalized = float(self.calibration.normalized([score], self.threshold)[0])
            percentile = float(self.calibration.percentile([score])[0])
            # a calibration that cannot normalise (non-finite normal scores): empty, never a guess
            normalized = normalized if math.isfinite(normalized) else None
            percentile = percentile if math.isfinite(percentile) else None
        return ScoredImage(
            item.path,
            score,
            decision,
            normalized,
            percentile,
            np.asarray(amap, np.float32),
            item.display,
            item.original_size,
        )

    def scored_batches(
        self, paths: Iterable[str | os.PathLike[str]], batch_size: int | None = None, workers: int | None = None
    ) -> Iterator[list[ScoredImage]]:
        """:meth:`score_batch` over ``paths`` in batches of ``batch_size`` (default: the model's
        ``forward_batch``), in input order, decoded ahead by ``workers`` threads (None:
        :func:`spotdiff.data.loader.decode_workers`). At most ``workers + 2 * batch_size`` decoded
        images wait for the model."""
        from spotdiff.data.loader import chunked, decode_workers, ordered_map

        step = batch_size or int(getattr(self.model, "forward_batch", 8))
        decoded = ordered_map(self.decode, paths, decode_workers(workers), ahead=2 * step)
        for chunk in chunked(decoded, step):
            yield self.score_batch(chunk)


def binary_mask(
    result: ScoredImage, pixel_threshold: float | None, size: tuple[int, int] | None = None
) -> np.ndarray | None:
    """The defect mask of ``result``: its map, bilinearly resized to ``size`` ``(H, W)`` (default: the
    original image's), ``> pixel_threshold``. Rule: an image judged ``normal`` has no defect pixels
    (its mask is empty, however many pixels pass the pixel threshold, which flags about
    ``target_fpr`` of normal pixels by construction); ``anomalous`` and ``no threshold`` images get
    the thresholded map. None without a pixel threshold or a map."""
    from spotdiff.detect.colour import resize_map

    if pixel_threshold is None or result.anomaly_map is None:
        return None
    size = size or result.original_size or result.anomaly_map.shape
    if result.decision in ("normal", ERROR):
        return np.zeros(size, bool)
    return resize_map(result.anomaly_map, size) > pixel_threshold


def overlay_picture(
    result: ScoredImage, scale: Any, threshold: float | None, pixel_threshold: float | None
) -> np.ndarray | None:
    """The overlay of ``result`` that ``predict`` writes (:func:`~spotdiff.detect.colour.render_overlay`):
    the original (``result.display``) beside its heat map on ``scale`` (a
    :class:`~spotdiff.detect.colour.ColourScale`), with the score, normalised score, decision, both
    thresholds and the outline of :func:`binary_mask` at the display's size; ``(H', W', 3)`` uint8.
    None for an error result or one decoded without ``keep_display``."""
    from spotdiff.detect.colour import render_overlay

    if result.decision == ERROR or result.score is None or result.display is None or result.anomaly_map is None:
        return None
    contour = binary_mask(result, pixel_threshold, result.display.shape[:2])
    return render_overlay(
        result.display,
        result.anomaly_map,
        scale,
        result.score,
        threshold,
        contour=contour,
        normalized=result.normalized_score,
        pixel_threshold=pixel_threshold,
        decision=result.decision,
    )
