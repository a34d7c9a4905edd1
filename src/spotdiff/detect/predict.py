"""Evaluation on labelled test sets and scoring of folders of new images (used by the CLI).

Both stream in batches: memory holds one batch of images plus, for evaluation, the maps
needed by pixel metrics (``N x H x W`` float32 for the test set).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from spotdiff.data.folder import list_images
from spotdiff.data.loader import batches, chunked, decode_workers, ordered_map
from spotdiff.data.io import load_image
from spotdiff.data.transforms import image_to_tensor
from spotdiff.detect.base import Detector
from spotdiff.detect.colour import colour_scale, normal_statistics, render_overlay, scale_from_normals
from spotdiff.errors import DataError
from spotdiff.files import atomic_path, write_json_atomic, write_text_atomic
from spotdiff.progress import log, progress
from spotdiff.tabular import csv_text

SCORE_COLUMNS = ("path", "label", "defect_type", "score")
PREDICT_COLUMNS = ("path", "score", "normalized_score", "decision", "anomalous", "threshold", "overlay", "mask",
                   "error")


def evaluate_detector(
    model: Detector, dataset: Dataset, batch_size: int | None = None, num_workers: int | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Score a labelled test set and compute :func:`spotdiff.metrics.evaluate` on it.

    Images are decoded by ``num_workers`` threads (None: :func:`spotdiff.data.loader.decode_workers`).

    ``dataset`` items are dicts with ``image``, ``label``, ``mask``, ``defect_type`` and ``path``
    (e.g. ``open_dataset(..., subset="test", image_size=model.image_size_)``). The metrics dict also
    holds ``test_set`` (:func:`count_test_set`).

    Returns:
        ``(metrics, records, maps, masks)``: the metrics dict (with ``per_defect_type``), one
        record per image ``{path, label, defect_type, score}``, anomaly maps ``(N, H, W)``
        float32 and ground-truth masks ``(N, H, W)`` uint8 in {0, 1}.
    """
    from spotdiff.metrics import evaluate

    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("the test set is empty")
    n = len(dataset)  # type: ignore[arg-type]
    size = batch_size or model.forward_batch
    loader = batches(dataset, size, decode_workers(num_workers))  # type: ignore[arg-type]
    records: list[dict[str, Any]] = []
    all_maps: np.ndarray | None = None
    all_masks: np.ndarray | None = None
    row = 0
    for batch in progress(loader, desc="scoring test set", total=-(-n // size), unit="batch"):
        scores, batch_maps = model.predict(batch["image"])
        if batch["mask"].shape[-2:] != batch_maps.shape[-2:]:
            raise DataError(
                f"mask size {tuple(batch['mask'].shape[-2:])} differs from the model's image size "
                f"{model.image_size_}; open the test set with image_size={model.image_size_}"
            )
        for i, score in enumerate(scores.tolist()):
            records.append({
                "path": str(batch["path"][i]),
                "label": int(batch["label"][i]),
                "defect_type": str(batch["defect_type"][i]),
                "score": float(score),
            })
        if all_maps is None or all_masks is None:  # preallocated: no concatenation copy at the end
            all_maps = np.empty((n, *batch_maps.shape[-2:]), dtype=np.float32)
            all_masks = np.empty((n, *batch_maps.shape[-2:]), dtype=np.uint8)
        stop = row + batch_maps.shape[0]
        all_maps[row:stop] = batch_maps.numpy()
        all_masks[row:stop] = (batch["mask"] > 0.5).numpy()
        row = stop
    assert all_maps is not None and all_masks is not None and row == n
    finite = np.isfinite([r["score"] for r in records]) & np.isfinite(all_maps.reshape(n, -1)).all(axis=1)
    if not finite.all():  # metrics on NaN would be a traceback or, worse, a number
        first = int(np.flatnonzero(~finite)[0])
        raise DataError(f"{records[first]['path']}: the model gives a non-finite score or map (NaN or infinity) "
                        f"on this test image ({int((~finite).sum())} of {n} such images); no metrics written")
    pixels = bool(all_masks.any())  # no mask at all (plain folders without masks): image metrics only
    metrics = evaluate(
        np.array([r["score"] for r in records]),
        np.array([r["label"] for r in records]),
        anomaly_maps=all_maps if pixels else None,
        masks=all_masks if pixels else None,
        defect_types=[r["defect_type"] for r in records],
    )
    metrics["test_set"] = count_test_set(metrics["per_defect_type"], records, all_masks)
    return metrics, records, all_maps, all_masks


def count_test_set(per_type: dict[str, Any], records: list[dict[str, Any]], masks: np.ndarray) -> dict[str, Any]:
    """What the metrics were measured on: image counts (normal, anomalous, per defect type) and
    pixel counts (all, anomalous). The positive fraction is the chance level of an AU-PR."""
    labels = np.array([r["label"] for r in records])
    types = [r["defect_type"] for r in records]
    return {"normal": int((labels == 0).sum()), "anomalous": int((labels == 1).sum()),
            "pixels": int(masks.size), "anomalous_pixels": int(np.count_nonzero(masks)),
            "per_defect_type": {t: sum(1 for x, y in zip(types, labels, strict=True) if x == t and y == 1)
                                for t in per_type}}


def _scores_csv(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV of ``columns`` of each record (empty where a record lacks one)."""
    return csv_text(columns, [[row.get(k, "") for k in columns] for row in rows])


def write_test_results(
    out_dir: str | os.PathLike[str],
    metrics: dict[str, Any],
    records: list[dict[str, Any]],
    maps: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``scores.csv`` (path,label,defect_type,score) and optionally ``maps.npz``
    (float16 maps, key ``maps``, with ``paths``), each atomically. Returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"metrics": out / "metrics.json", "scores": out / "scores.csv"}
    write_json_atomic(written["metrics"], metrics)
    write_text_atomic(written["scores"], _scores_csv(records, SCORE_COLUMNS))
    if maps is not None:
        written["maps"] = out / "maps.npz"
        with atomic_path(written["maps"]) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, maps=maps.astype(np.float16), paths=np.array([r["path"] for r in records]))
    return written


def collect_images(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and directories into image paths.

    Directories are searched recursively by ``spotdiff.data.list_images`` (image extensions,
    hidden files skipped, sorted). Explicit files are kept as given, images or not, so that
    ``predict`` reports an unreadable one in its own row instead of stopping.

    Raises:
        DataError: an input does not exist, or nothing was found.
    """
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            try:
                paths.extend(list_images(item, recursive=True))
            except DataError:  # a folder without images: only an error if nothing is found at all
                pass
        elif item.exists():
            paths.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    if not paths:
        raise DataError(f"no image files found in {[str(i) for i in inputs]}")
    return paths


def overlay_heatmap(
    image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5
) -> np.ndarray:
    """Blend the 'jet' colouring of ``anomaly_map`` (clipped to [vmin, vmax]) over an ``(H, W, 3)`` uint8 image."""
    from matplotlib import colormaps

    span = max(vmax - vmin, 1e-12)
    norm = np.clip((anomaly_map - vmin) / span, 0.0, 1.0)
    heat = colormaps["jet"](norm)[..., :3] * 255.0
    return np.clip((1.0 - alpha) * image + alpha * heat, 0, 255).astype(np.uint8)


def draw_mask_contour(overlay: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """``overlay`` ``(H, W, 3)`` uint8 with the 1-px outline of the binary ``mask`` ``(H, W)`` drawn in ``colour``."""
    from scipy.ndimage import binary_erosion

    edge = mask & ~binary_erosion(mask, border_value=0)
    out = overlay.copy()
    out[edge] = colour
    return out


def _unique_name(stem: str, used: set[str]) -> str:
    name, n = f"{stem}.png", 1
    while name in used:
        name, n = f"{stem}_{n}.png", n + 1
    used.add(name)
    return name


def predict_images(
    model: Detector,
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    threshold: float | None = None,
    batch_size: int | None = None,
    overlays: bool = True,
    masks: bool = False,
    pixel_threshold: float | None = None,
    num_workers: int | None = None,
) -> list[dict[str, Any]]:
    """Score image files in batches; write ``scores.csv`` and heat-map overlays under ``out_dir``.

    Files are decoded and resized by ``num_workers`` threads (None: ``decode_workers()``).

    Every image is converted to RGB (grayscale, RGBA, palette, 16-bit; see ``load_image``) and
    resized to the model's image size, so mixed sizes are fine; overlays are drawn at that size
    in ``out_dir/overlays/<stem>.png``, all on the model's one colour scale
    (:func:`spotdiff.detect.colour.colour_scale`), each with a colour bar, its score and the decision.
    ``threshold`` / ``pixel_threshold`` default to the model's calibration (``model.calibration_``);
    with a pixel threshold, overlays carry the outline of the binary defect mask, and ``masks``
    writes that mask as ``out_dir/masks/<stem>.png`` (0/255).
    A file that cannot be read gets a row with an ``error`` message and the batch goes on.

    Returns:
        One record per input file: ``path``, ``score`` (raw), ``normalized_score`` (fraction of normal
        validation images scoring lower; "" without calibration), ``decision`` (``anomalous``,
        ``normal`` or ``no threshold``), ``anomalous`` (1/0), ``threshold``, ``overlay``, ``mask``,
        ``error`` (empty fields as "").
    """
    from spotdiff.detect.calibration import decide, model_calibration

    cal = model_calibration(model)
    threshold = threshold if threshold is not None else (cal.image_threshold if cal else None)
    pixel_threshold = pixel_threshold if pixel_threshold is not None else (cal.pixel_threshold if cal else None)
    if masks and pixel_threshold is None:
        from spotdiff.errors import ConfigError

        raise ConfigError("binary masks need a pixel threshold: the model has no calibration; give --pixel-threshold")
    paths = collect_images(inputs)
    out = Path(out_dir)
    overlay_dir, mask_dir = out / "overlays", out / "masks"
    if overlays:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    if masks:
        mask_dir.mkdir(parents=True, exist_ok=True)
    assert model.image_size_ is not None
    records: list[dict[str, Any]] = []
    used: set[str] = set()
    scale = colour_scale(model, threshold)
    size = model.image_size_

    def decode(path: Path) -> tuple[Path, torch.Tensor | DataError]:
        try:
            return path, image_to_tensor(load_image(path), size)
        except DataError as exc:
            return path, exc

    step = batch_size or model.forward_batch
    chunks = chunked(ordered_map(decode, paths, decode_workers(num_workers), ahead=2 * step), step)
    for chunk in progress(chunks, desc="predicting", total=-(-len(paths) // step), unit="batch"):
        tensors, good = [], []
        for path, decoded in chunk:
            if isinstance(decoded, DataError):
                records.append({**dict.fromkeys(PREDICT_COLUMNS, ""), "path": str(path), "error": str(decoded)})
            else:
                tensors.append(decoded)
                good.append(path)
        if not tensors:
            continue
        images = torch.stack(tensors)
        scores, maps = model.predict(images)
        normalized = cal.normalized(scores.numpy()) if cal else [""] * len(good)
        decisions = decide(scores, threshold)
        for path, image, score, amap, norm, decision in zip(good, images, scores.tolist(), maps.numpy(), normalized,
                                                             decisions, strict=True):
            record: dict[str, Any] = {"path": str(path), "score": score, "normalized_score": norm, "decision": decision,
                                      "anomalous": "", "threshold": "", "overlay": "", "mask": "", "error": ""}
            if threshold is not None:
                record["anomalous"] = int(score > threshold)
                record["threshold"] = threshold
            name = _unique_name(path.stem, used)
            binary = amap > pixel_threshold if pixel_threshold is not None else None
            if masks and binary is not None:
                with atomic_path(mask_dir / name) as tmp:
                    Image.fromarray(binary.astype(np.uint8) * 255).save(tmp, format="PNG")
                record["mask"] = str(mask_dir / name)
            if overlays:
                if scale is None:  # a model directory without normal statistics: fixed from this first batch
                    scale = scale_from_normals(normal_statistics(scores.numpy(), maps.numpy()), "first batch")
                    log(f"warning: {len(good)} image(s) of the first batch fix the overlays' colour scale; "
                        "re-fit the model (or give --threshold) for a scale fixed by the model")
                pixels = (image.permute(1, 2, 0).numpy() * 255.0).round()
                target = overlay_dir / name
                with atomic_path(target) as tmp:
                    Image.fromarray(render_overlay(pixels, amap, scale, score, threshold, contour=binary)).save(
                        tmp, format="PNG")
                record["overlay"] = str(target)
            records.append(record)
    order = {str(p): i for i, p in enumerate(paths)}
    records.sort(key=lambda r: order[r["path"]])
    write_text_atomic(out / "scores.csv", _scores_csv(records, PREDICT_COLUMNS))
    return records
