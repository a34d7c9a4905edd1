"""One colour scale per model for heat-map overlays, and the overlay picture itself.

A heat map coloured by its own min..max makes every image look equally alarming: the quietest
normal image gets red blobs. spotdiff colours every map of a model on **one** scale, fixed by the
model's own scores on normal images, and draws a colour bar, the image score and the decision on
every overlay.

Rule (our choice; :func:`scale_from_normals`): from the anomaly maps of normal images,
``vmin`` = the median map value (a typical normal pixel is the bottom of the scale, dark blue) and
``vmax = vmin + 2 * (s_max - vmin)`` where ``s_max`` is the highest image score among them, so the
highest-scoring normal image sits mid-scale (green) and only scores beyond it turn yellow to red.
In ``predict`` (:func:`colour_scale`, the one place to change), in order of preference:

1. the image threshold ``T``: ``--threshold T``, or else the model's calibrated threshold (chosen on
   held-out normal images, :mod:`spotdiff.detect.calibration`): ``0 .. 2T`` (the threshold
   mid-scale, green);
2. the rule on ``NORMAL_SAMPLE`` of the model's own training images, scored right after fitting and
   recorded in ``config.json`` as ``normal_maps``. These are *in-sample* scores, lower than those of
   unseen normal images (for PaDiM much lower when the training images are few compared with its
   ``d`` channels), so unseen normal images can reach yellow or red on this scale: read the colour
   bar, and prefer 1;
3. model directories written before ``normal_maps`` existed: the rule on the first batch that
   ``predict`` scores; the scale then stays fixed for the rest of the run (a warning says so).

In evaluation (the report's gallery), the rule is applied to the test set's normal images, which
the model has not seen (:func:`scale_from_normals` on :func:`normal_statistics` of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

NORMAL_SAMPLE = 16
"""Training images (evenly spread over the training set) scored after fitting to fix the scale."""


@dataclass(frozen=True)
class ColourScale:
    """Map values ``vmin`` .. ``vmax`` span the colour map; ``source`` says where they come from."""

    vmin: float
    vmax: float
    source: str


def normal_statistics(scores: np.ndarray, maps: np.ndarray) -> dict[str, Any]:
    """What a model records about its normal images: count, map-value median and 99th percentile,
    image-score max and mean (``scores`` (N,), ``maps`` (N, H, W) in the model's units)."""
    values = np.asarray(maps, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64)
    return {"images": int(scores.size), "map_median": float(np.median(values)),
            "map_p99": float(np.quantile(values, 0.99)), "score_max": float(scores.max()),
            "score_mean": float(scores.mean())}


def scale_from_normals(stats: dict[str, Any], source: str) -> ColourScale:
    """The rule of the module docstring applied to :func:`normal_statistics` output."""
    vmin = float(stats["map_median"])
    vmax = vmin + 2.0 * max(float(stats["score_max"]) - vmin, 1e-6)
    return ColourScale(vmin, vmax, source)


def colour_scale(model: Any, threshold: float | None = None) -> ColourScale | None:
    """The colour scale of ``model`` (a fitted :class:`~spotdiff.detect.base.Detector`), or None
    when the model records nothing and no threshold is given (the caller then fixes the scale from
    its first batch with :func:`scale_from_normals`)."""
    # predict passes the calibrated image threshold as ``threshold`` when no --threshold is given
    if threshold is not None:
        return ColourScale(0.0, 2.0 * threshold, f"0 .. 2 x threshold {threshold:g}")
    stats = getattr(model, "normal_maps_", None)
    if stats:
        return scale_from_normals(stats, f"{stats['images']} training normal images (in-sample)")
    return None


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def render_overlay(image: np.ndarray, anomaly_map: np.ndarray, scale: ColourScale, score: float,
                   threshold: float | None = None, alpha: float = 0.5,
                   contour: np.ndarray | None = None) -> np.ndarray:
    """An annotated overlay: ``image`` (H, W, 3) uint8 with the jet-coloured ``anomaly_map``
    (H, W) on ``scale``, a title line with the score and the decision (``score > threshold``;
    "no threshold" without one) and a colour bar on the right with its end values and the
    threshold marked; ``contour`` (H, W) bool, a binary defect mask, is outlined in white.
    Returns an RGB uint8 array, wider and taller than the image."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    from spotdiff.detect.predict import draw_mask_contour, overlay_heatmap

    h, w = image.shape[:2]
    size = max(9, min(14, h // 8))
    font = _font(size)
    if threshold is None:
        decision = "no threshold"
    else:
        decision = f"{'ANOMALOUS' if score > threshold else 'normal'} (T {threshold:.3g})"
    title = f"score {score:.3g} | {decision}"
    bar_w, pad, head = max(8, w // 16), 4, size + 6
    labels = [f"{scale.vmax:.3g}", f"{scale.vmin:.3g}"]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(t, font=font)) for t in labels)
    width = max(w + pad + bar_w + pad + label_w + pad, int(probe.textlength(title, font=font)) + 2 * pad)
    canvas = Image.new("RGB", (width, head + h + pad), "white")
    heat = overlay_heatmap(image, anomaly_map, scale.vmin, scale.vmax, alpha)
    if contour is not None:
        heat = draw_mask_contour(heat, contour)
    canvas.paste(Image.fromarray(heat), (0, head))
    ramp = colormaps["jet"](np.linspace(1.0, 0.0, h))[:, None, :3] * 255.0  # top = vmax
    canvas.paste(Image.fromarray(np.repeat(ramp, bar_w, axis=1).astype(np.uint8)), (w + pad, head))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), title, fill="black", font=font)
    x_text = w + pad + bar_w + pad
    draw.text((x_text, head), labels[0], fill="black", font=font)
    draw.text((x_text, head + h - size - 1), labels[1], fill="black", font=font)
    if threshold is not None and scale.vmin < threshold < scale.vmax:
        y = head + round((scale.vmax - threshold) / (scale.vmax - scale.vmin) * (h - 1))
        draw.line([(w + pad - 2, y), (w + pad + bar_w + 1, y)], fill="black", width=2)
    return np.asarray(canvas)
