"""Figures for the report, rendered off-screen (matplotlib Agg) to PNG bytes.

* :func:`curves_figure` -- image-level PR and ROC curves of several methods on one object;
* :func:`gallery_figure` -- test images with the ground-truth outline (contour of the mask) and
  the anomaly heat map overlaid on the model's fixed colour scale (with a colour bar);
  :func:`select_best` picks the best detections, :func:`select_gallery` the worst cases;
* :func:`defect_breakdown_figure` -- a grouped bar chart of a metric per defect type, with the
  number of images of each type; types with fewer than ``FEW_IMAGES`` are greyed out.

No pyplot state is used: each figure is a standalone :class:`matplotlib.figure.Figure`.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from numpy.typing import ArrayLike
from PIL import Image

from spotdiff.metrics import evaluate, pr_curve, roc_curve

DPI = 100
FEW_IMAGES = 5
"""Defect types with fewer anomalous test images than this are greyed out in the breakdown."""


@dataclass(frozen=True)
class ScoreSet:
    """Image-level scores of one method on one object: ``scores`` (N,) higher = more anomalous,
    ``labels`` (N,) 0 normal / 1 anomalous."""

    method: str
    scores: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class GalleryItem:
    """One gallery tile. ``image`` (H, W, 3) in [0, 1] or uint8; ``anomaly_map`` (h, w), any range
    (resized to the image); ``mask`` (H, W) ground truth in {0, 1} or None."""

    image: np.ndarray
    anomaly_map: np.ndarray | None
    mask: np.ndarray | None
    score: float
    label: int
    caption: str = ""
    kind: str = ""  # what the tile is (:func:`gallery_kind`), e.g. "lowest-scoring defect"


@dataclass
class Predictions:
    """Per-image outputs of one method on one object's test set, kept for the report's figures.

    ``scores`` (N,) image scores, higher = more anomalous; ``labels`` (N,) 0/1;
    ``defect_types`` N names ("good" for normal); ``anomaly_maps`` (N, h, w) or None;
    ``masks`` (N, H, W) in {0, 1} or None; ``images`` (N, H, W, 3) in [0, 1] or None;
    ``paths`` N image files, read (and resized to the masks' or maps' size) for the gallery when
    ``images`` is None, so only the few gallery images are ever held in memory;
    ``map_range`` the model's fixed colour scale ``(vmin, vmax)`` (:mod:`spotdiff.detect.colour`);
    ``threshold`` the score above which an image is flagged (the gallery's decision).
    """

    object: str
    method: str
    scores: np.ndarray
    labels: np.ndarray
    defect_types: list[str] | None = None
    anomaly_maps: np.ndarray | None = None
    masks: np.ndarray | None = None
    images: np.ndarray | None = None
    paths: list[str] | None = None
    map_range: tuple[float, float] | None = None
    threshold: float | None = None

    def image(self, i: int) -> np.ndarray | None:
        """Test image ``i`` as (H, W, 3) in [0, 1], or None when neither images nor paths are kept."""
        if self.images is not None:
            return np.asarray(self.images[i])
        if self.paths is None:
            return None
        from spotdiff.data.io import load_image

        img = load_image(self.paths[i])
        ref = self.masks if self.masks is not None else self.anomaly_maps
        if ref is not None:
            img = img.resize((ref.shape[-1], ref.shape[-2]), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.float32) / 255.0

    def score_set(self) -> ScoreSet:
        return ScoreSet(self.method, np.asarray(self.scores), np.asarray(self.labels))

    def gallery_items(self, n: int) -> list[GalleryItem]:
        """Gallery tiles: the ``n // 2`` best detections (:func:`select_best`), then the
        ``n - n // 2`` worst cases (:func:`select_gallery`: lowest-scoring defects and highest-scoring
        normal images); needs images or paths."""
        if self.images is None and self.paths is None:
            return []
        worst = select_gallery(self.scores, self.labels, n - n // 2)
        best = [i for i in select_best(self.scores, self.labels, n) if i not in worst][: n // 2]
        items = []
        for row, picks in (("best", best), ("worst", worst)):
            for i in picks:
                image = self.image(i)
                assert image is not None  # images or paths, checked above
                kind = gallery_kind(row, int(self.labels[i]))
                caption = self.defect_types[i] if self.defect_types is not None else ""
                items.append(
                    GalleryItem(
                        image=image,
                        anomaly_map=None if self.anomaly_maps is None else self.anomaly_maps[i],
                        mask=None if self.masks is None else self.masks[i],
                        score=float(self.scores[i]),
                        label=int(self.labels[i]),
                        caption=caption,
                        kind=kind,
                    )
                )
        return items


def curve_area(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under a curve whose ``x`` is monotone (either direction), as
    ``sklearn.metrics.auc`` computes it; the legend value of :func:`curves_figure`."""
    return abs(float(np.trapezoid(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))))


def gallery_kind(row: str, label: int) -> str:
    """What a gallery tile is: ``row`` "best" (top row) or "worst" (bottom row), ``label`` 1 = anomalous."""
    if row == "best":
        return "highest-scoring defect"
    return "lowest-scoring defect" if label == 1 else "highest-scoring normal"


def gallery_decision(label: int, score: float, threshold: float | None) -> str:
    """The decision at ``threshold`` (``score > threshold``: flagged) in the operator's words: a
    defect is "caught" or "missed", a normal image "false alarm" or "passed"; "" without a threshold."""
    if threshold is None:
        return ""
    flagged = score > threshold
    if label == 1:
        return "caught" if flagged else "missed"
    return "false alarm" if flagged else "passed"


def per_defect_type_auroc(scores: ArrayLike, labels: ArrayLike, defect_types: Sequence[str]) -> dict[str, float]:
    """Image AU-ROC of each defect type against all normal images (fractions), from
    :func:`spotdiff.metrics.evaluate` (``per_defect_type``). Empty without both classes."""
    label_arr = np.asarray(labels).astype(int)
    if not _has_both_classes(label_arr):
        return {}
    result = evaluate(np.asarray(scores, dtype=np.float64), label_arr, defect_types=list(defect_types))
    return {name: float(entry["image_auroc"]) for name, entry in result["per_defect_type"].items()}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _has_both_classes(labels: np.ndarray) -> bool:
    return bool(np.any(labels == 1) and np.any(labels == 0))


def curves_figure(score_sets: Sequence[ScoreSet], title: str = "") -> bytes:
    """PR (left) and ROC (right) image-level curves, one line per method; PNG bytes.

    The legend gives the area under each curve (AU-PR by trapezoidal rule on the PR curve, as the
    VisA protocol, and AU-ROC: the metrics module's image AU-PR and AU-ROC). Methods whose labels
    lack a class are listed as "n/a".
    """
    fig = Figure(figsize=(9, 3.8))
    ax_pr, ax_roc = fig.subplots(1, 2)
    for s in score_sets:
        labels = np.asarray(s.labels).astype(int).ravel()
        scores = np.asarray(s.scores, dtype=np.float64).ravel()
        if not _has_both_classes(labels):
            ax_pr.plot([], [], label=f"{s.method} (n/a)")
            ax_roc.plot([], [], label=f"{s.method} (n/a)")
            continue
        precision, recall, _ = pr_curve(scores, labels)
        fpr, tpr, _ = roc_curve(scores, labels)
        # legend: trapezoidal areas of the plotted curves (= the metrics' image AU-PR / AU-ROC)
        ax_pr.plot(recall, precision, label=f"{s.method} ({100 * curve_area(recall, precision):.1f})")
        ax_roc.plot(fpr, tpr, label=f"{s.method} ({100 * curve_area(fpr, tpr):.1f})")
    ax_pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="PR (AU-PR %)")
    ax_roc.set(
        xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02), title="ROC (AU-ROC %)"
    )
    ax_roc.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    for ax in (ax_pr, ax_roc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left" if ax is ax_pr else "lower right")
    if title:
        fig.suptitle(title)
    return _png(fig)


def select_gallery(scores: ArrayLike, labels: ArrayLike, n: int) -> list[int]:
    """Indices of ``n`` test images, worst cases first.

    Anomalous images sorted by ascending score (missed defects) are interleaved with normal images
    sorted by descending score (false alarms): anomalous first, then normal, and so on. When one
    class runs out the other fills the rest.
    """
    score_arr = np.asarray(scores, dtype=np.float64)
    label_arr = np.asarray(labels).astype(int)
    anomalous = [int(i) for i in np.flatnonzero(label_arr == 1)[np.argsort(score_arr[label_arr == 1], kind="stable")]]
    normal = [int(i) for i in np.flatnonzero(label_arr == 0)[np.argsort(-score_arr[label_arr == 0], kind="stable")]]
    out: list[int] = []
    while len(out) < n and (anomalous or normal):
        for pool in (anomalous, normal):
            if pool and len(out) < n:
                out.append(pool.pop(0))
    return out


def select_best(scores: ArrayLike, labels: ArrayLike, n: int) -> list[int]:
    """Indices of the ``n`` best detections: anomalous images by descending score."""
    score_arr = np.asarray(scores, dtype=np.float64)
    anomalous = np.flatnonzero(np.asarray(labels).astype(int) == 1)
    return [int(i) for i in anomalous[np.argsort(-score_arr[anomalous], kind="stable")][:n]]


def _resize_map(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map to ``shape`` (H, W)."""
    if amap.shape == shape:
        return amap
    img = Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32))  # mode "F"
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def gallery_figure(
    items: Sequence[GalleryItem],
    columns: int = 4,
    title: str = "",
    map_range: tuple[float, float] | None = None,
    threshold: float | None = None,
) -> bytes:
    """A grid of test images with heat-map overlay (jet, alpha 0.45) and ground-truth contour (lime).

    The heat maps share one colour range, shown by a colour bar: ``map_range`` (the model's fixed
    scale) or else the min/max over all tiles' maps. Each tile's title gives what it is (``kind``),
    the image score and, when ``threshold`` is set, the decision in the operator's words
    (:func:`gallery_decision`).
    """
    if not items:
        raise ValueError("gallery_figure needs at least one item")
    columns = max(1, min(columns, len(items)))
    rows = (len(items) + columns - 1) // columns
    fig = Figure(figsize=(2.6 * columns, 3.3 * rows), layout="constrained")  # room for 4-line titles
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    maps = [np.asarray(it.anomaly_map, dtype=np.float32) for it in items if it.anomaly_map is not None]
    if map_range is None and maps:
        map_range = (float(min(m.min() for m in maps)), float(max(m.max() for m in maps)))
    for ax, it in zip(axes, items, strict=False):
        image = np.asarray(it.image)
        if image.dtype != np.uint8:
            image = np.clip(image, 0.0, 1.0)
        ax.imshow(image)
        h, w = image.shape[:2]
        if it.anomaly_map is not None and map_range is not None:
            amap = _resize_map(np.asarray(it.anomaly_map, dtype=np.float32), (h, w))
            ax.imshow(amap, cmap="jet", alpha=0.45, vmin=map_range[0], vmax=max(map_range[1], map_range[0] + 1e-12))
        if it.mask is not None and np.any(np.asarray(it.mask) > 0):
            ax.contour((np.asarray(it.mask) > 0).astype(float), levels=[0.5], colors="lime", linewidths=1.2)
        lines = [it.kind or ("anomalous" if it.label == 1 else "normal")]
        decision = gallery_decision(it.label, it.score, threshold)
        lines.append(f"score {it.score:.3g}" + (f": {decision}" if decision else ""))
        if it.caption and it.caption != "good":
            lines.append(textwrap.shorten(it.caption, 30, placeholder="..."))  # one line, never overlaps
        ax.set_title("\n".join(lines), fontsize=8)
        ax.set_axis_off()
    for ax in axes[len(items) :]:
        ax.set_axis_off()
    if maps and map_range is not None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        norm = Normalize(vmin=map_range[0], vmax=max(map_range[1], map_range[0] + 1e-12))
        cbar = fig.colorbar(ScalarMappable(norm=norm, cmap="jet"), ax=list(axes), shrink=0.8, pad=0.02)
        cbar.set_label("anomaly map (model's fixed scale)", fontsize=8)
    if title:
        fig.suptitle(title)
    return _png(fig)


def defect_breakdown_figure(
    breakdown: Mapping[str, Mapping[str, float | None]],
    metric_label: str = "image AU-ROC",
    title: str = "",
    counts: Mapping[str, int] | None = None,
) -> bytes:
    """Grouped horizontal bars of ``breakdown[method][defect_type]`` (fractions, shown in %); PNG bytes.

    Missing values leave a gap in their group. With ``counts`` (anomalous test images per defect
    type) each label says ``(n=...)`` and types with fewer than ``FEW_IMAGES`` images are grey.
    """
    methods = list(breakdown)
    defect_types = list(dict.fromkeys(d for m in methods for d in breakdown[m]))
    if not defect_types:
        raise ValueError("defect_breakdown_figure needs at least one defect type")
    # horizontal bars: defect-type names stay readable however many there are
    n_methods = max(1, len(methods))
    fig = Figure(figsize=(7.5, 1.2 + 0.12 * len(defect_types) * (n_methods + 1)))
    ax = fig.subplots()
    height = 0.8 / n_methods
    y = np.arange(len(defect_types))
    handles = []
    for k, method in enumerate(methods):
        values = [breakdown[method].get(d) for d in defect_types]
        widths = [np.nan if v is None else 100.0 * float(v) for v in values]
        colour = f"C{k % 10}"
        handles.append(Patch(color=colour, label=method))
        bars = ax.barh(y + (k - (n_methods - 1) / 2) * height, widths, height, color=colour)
        for d, patch in zip(defect_types, bars, strict=True):
            if counts is not None and counts.get(d, 0) < FEW_IMAGES:
                patch.set_alpha(0.25)  # greyed out: too few images
    names = defect_types if counts is None else [f"{d} (n={counts.get(d, 0)})" for d in defect_types]
    ax.set_yticks(y, names, fontsize=8)
    if counts is not None:
        for label, d in zip(ax.get_yticklabels(), defect_types, strict=True):
            if counts.get(d, 0) < FEW_IMAGES:
                label.set_color("0.55")
    ax.invert_yaxis()  # first defect type on top
    ax.set(xlabel=f"{metric_label} (%)", xlim=(0, 100))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title)
    return _png(fig)
