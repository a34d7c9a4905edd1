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

import functools
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
    return {
        "images": int(scores.size),
        "map_median": float(np.median(values)),
        "map_p99": float(np.quantile(values, 0.99)),
        "score_max": float(scores.max()),
        "score_mean": float(scores.mean()),
    }


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


@functools.cache
def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


@functools.cache
def jet_lut() -> np.ndarray:
    """matplotlib's 'jet' colour map as a ``(256, 3)`` uint8 lookup table (matplotlib is imported once)."""
    from matplotlib import colormaps

    return np.round(colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint8)


def colourize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``values`` ``(H, W)`` clipped to [vmin, vmax] and coloured by :func:`jet_lut`: ``(H, W, 3)`` uint8."""
    span = max(vmax - vmin, 1e-12)
    index = np.clip((np.asarray(values, np.float32) - vmin) * (255.0 / span), 0.0, 255.0)
    return jet_lut()[np.nan_to_num(index, nan=0.0).astype(np.uint8)]


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``anomaly_map`` ``(h, w)`` bilinearly resized to ``size`` ``(H, W)`` float32 (a copy-free no-op at equal size)."""
    from PIL import Image

    amap = np.asarray(anomaly_map, np.float32)
    if amap.shape == tuple(size):
        return amap
    return np.asarray(Image.fromarray(amap, mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR))


def outline(mask: np.ndarray) -> np.ndarray:
    """The 1-px inner outline of a binary ``mask`` ``(H, W)``: mask pixels with a 4-neighbour outside it."""
    m = np.asarray(mask, bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    inner[0, :] = inner[-1, :] = False
    inner[:, 0] = inner[:, -1] = False
    return m & ~inner


def overlay_heatmap(
    image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5
) -> np.ndarray:
    """Blend the jet colouring of ``anomaly_map`` (clipped to [vmin, vmax], resized to the image) over
    an ``(H, W, 3)`` uint8 image; returns ``(H, W, 3)`` uint8."""
    amap = resize_map(anomaly_map, image.shape[:2])
    heat = (1.0 - alpha) * image + alpha * colourize(amap, vmin, vmax).astype(np.float32)
    return np.clip(heat.round(), 0, 255).astype(np.uint8)


def draw_mask_contour(
    overlay: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """``overlay`` ``(H, W, 3)`` uint8 with the 1-px outline (:func:`outline`) of the binary ``mask``
    ``(H, W)`` drawn in ``colour`` (a copy)."""
    out = overlay.copy()
    out[outline(mask)] = colour
    return out


PAD = 4
"""Pixels between the overlay's parts."""


def overlay_layout(panel_h: int, panel_w: int) -> dict[str, tuple[int, int, int, int]]:
    """Where :func:`render_overlay` puts its parts for panels of ``panel_h x panel_w`` pixels:
    ``{"original", "heat", "bar": (top, left, height, width)}`` and the ``"font"`` size in ``(0, 0, size, 0)``."""
    size = max(11, min(18, panel_h // 20))
    head = 2 * (size + 4) + PAD
    bar_w = max(10, panel_w // 24)
    return {
        "original": (head, 0, panel_h, panel_w),
        "heat": (head, panel_w + PAD, panel_h, panel_w),
        "bar": (head, 2 * panel_w + 2 * PAD, panel_h, bar_w),
        "font": (0, 0, size, 0),
    }


def render_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    scale: ColourScale,
    score: float,
    threshold: float | None = None,
    alpha: float = 0.5,
    contour: np.ndarray | None = None,
    *,
    normalized: float | None = None,
    pixel_threshold: float | None = None,
    decision: str | None = None,
) -> np.ndarray:
    """The overlay an operator reads: the original ``image`` (H, W, 3) uint8 on the left, the same
    image with the jet-coloured ``anomaly_map`` (any size; resized bilinearly to H x W) on ``scale``
    on the right, and a colour bar with its end values, the image threshold and the pixel threshold
    marked. Two title lines: the score, the normalised score and the decision (``decision``, else
    ``score > threshold``; "no threshold" without one); the thresholds. ``contour`` (H, W) bool, a
    binary defect mask at the image's size, is outlined in white on the heat panel.

    Drawn with array operations and Pillow's text (no plotting library per image; see
    :func:`jet_lut`). Returns an RGB uint8 array ``(head + H + PAD, 2 W + bar + labels)``.
    """
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    box = overlay_layout(h, w)
    size = box["font"][2]
    font = _font(size)
    if decision is None:
        decision = "no threshold" if threshold is None else ("anomalous" if score > threshold else "normal")
    line1 = f"{decision.upper() if decision == 'anomalous' else decision} | score {score:.4g}"
    if normalized is not None:
        line1 += f" | normalised {normalized:.3f}"
    thresholds = [f"image threshold {threshold:.4g}" if threshold is not None else "no image threshold"]
    if pixel_threshold is not None:
        thresholds.append(f"pixel threshold {pixel_threshold:.4g}")
    line2 = ", ".join(thresholds) + f" | colour scale {scale.vmin:.3g} .. {scale.vmax:.3g} (map value)"
    marks = [(scale.vmax, f"{scale.vmax:.3g}"), (scale.vmin, f"{scale.vmin:.3g}")]
    inside = [
        (v, f"{name} {v:.3g}")
        for v, name in ((threshold, "image T"), (pixel_threshold, "pixel T"))
        if v is not None and scale.vmin < v < scale.vmax
    ]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(t, font=font)) for _, t in marks + inside)
    top, bar_x, _, bar_w = box["bar"]
    width = max(
        bar_x + bar_w + PAD + label_w + PAD, max(int(probe.textlength(t, font=font)) for t in (line1, line2)) + 2 * PAD
    )
    canvas = np.full((top + h + PAD, width, 3), 255, np.uint8)
    canvas[top : top + h, :w] = image
    heat = overlay_heatmap(image, anomaly_map, scale.vmin, scale.vmax, alpha)
    if contour is not None:
        heat = draw_mask_contour(heat, contour)
    canvas[top : top + h, w + PAD : 2 * w + PAD] = heat
    ramp = jet_lut()[np.linspace(255, 0, h).round().astype(np.uint8)]  # top = vmax
    canvas[top : top + h, bar_x : bar_x + bar_w] = ramp[:, None, :]
    span = max(scale.vmax - scale.vmin, 1e-12)

    def row(value: float) -> int:
        return top + round((scale.vmax - value) / span * (h - 1))

    for value, _ in inside:
        y = row(value)
        canvas[max(top, y - 1) : y + 1, bar_x - 2 : bar_x + bar_w + 2] = 0
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    draw.text((PAD, 2), line1, fill="black", font=font)
    draw.text((PAD, 2 + size + 4), line2, fill="black", font=font)
    x_text = bar_x + bar_w + PAD
    draw.text((x_text, top), marks[0][1], fill="black", font=font)
    draw.text((x_text, top + h - size - 1), marks[1][1], fill="black", font=font)
    for value, text in inside:
        y = min(max(row(value) - size // 2, top + size + 2), top + h - 2 * size - 2)
        draw.text((x_text, y), text, fill="black", font=font)
    return np.asarray(pil)
