"""Evaluation of a fitted detector on a labelled test set (used by ``spotdiff test``).

Streams in batches: memory holds one batch of images plus the maps needed by pixel metrics
(``N x H x W`` float32 for the test set).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from spotdiff.data import open_dataset
from spotdiff.data.dataset import AnomalyDataset
from spotdiff.data.loader import ItemDataset, batches, decode_workers
from spotdiff.data.plain import FolderSet, Images, open_folders
from spotdiff.detect.base import Detector
from spotdiff.detect.calibration import model_calibration
from spotdiff.errors import ConfigError, DataError
from spotdiff.files import atomic_path, write_json_atomic, write_text_atomic
from spotdiff.progress import progress
from spotdiff.tabular import csv_text

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("path", "label", "defect_type", "score", "decision")


def evaluate_detector(
    model: Detector, dataset: ItemDataset, batch_size: int | None = None, num_workers: int | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Score a labelled test set and compute :func:`spotdiff.metrics.evaluate` on it.

    Images are decoded by ``num_workers`` threads (None: :func:`spotdiff.data.loader.decode_workers`).

    ``dataset`` items are dicts with ``image``, ``label``, ``mask``, ``defect_type`` and ``path``
    (e.g. ``open_dataset(..., subset="test", image_size=model.image_size_)``). The metrics dict also
    holds ``test_set`` (:func:`count_test_set`) and, for a calibrated model, ``decisions``
    (:func:`decision_metrics` at the model's thresholds).

    Returns:
        ``(metrics, records, maps, masks)``: the metrics dict (with ``per_defect_type``), one
        record per image ``{path, label, defect_type, score, decision}`` (decision ``anomalous`` /
        ``normal``, ``""`` without calibration), anomaly maps ``(N, H, W)`` float32 and ground-truth
        masks ``(N, H, W)`` uint8 in {0, 1}.

    Raises:
        DataError: the test set is empty, or a score or map is not finite (no metric is computed
            from it, and no image is called normal because of it).
    """
    from spotdiff.metrics import evaluate

    if len(dataset) == 0:
        raise DataError("the test set is empty")
    n = len(dataset)
    size = batch_size or model.forward_batch
    loader = batches(dataset, size, decode_workers(num_workers))
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
            records.append(
                {
                    "path": str(batch["path"][i]),
                    "label": int(batch["label"][i]),
                    "defect_type": str(batch["defect_type"][i]),
                    "score": float(score),
                    "decision": "",
                }
            )
        if all_maps is None or all_masks is None:  # preallocated: no concatenation copy at the end
            all_maps = np.empty((n, *batch_maps.shape[-2:]), dtype=np.float32)
            all_masks = np.empty((n, *batch_maps.shape[-2:]), dtype=np.uint8)
        stop = row + batch_maps.shape[0]
        all_maps[row:stop] = batch_maps.numpy()
        all_masks[row:stop] = (batch["mask"] > 0.5).numpy()
        row = stop
    assert all_maps is not None and all_masks is not None and row == n
    _check_finite(records, all_maps)
    pixels = bool(all_masks.any())  # no mask at all (plain folders without masks): image metrics only
    metrics = evaluate(
        np.array([r["score"] for r in records]),
        np.array([r["label"] for r in records]),
        anomaly_maps=all_maps if pixels else None,
        masks=all_masks if pixels else None,
        defect_types=[r["defect_type"] for r in records],
    )
    metrics["test_set"] = count_test_set(metrics["per_defect_type"], records, all_masks)
    cal = model_calibration(model)
    if cal is not None:
        metrics["decisions"] = decision_metrics(records, all_maps, all_masks, cal.image_threshold, cal.pixel_threshold)
    return metrics, records, all_maps, all_masks


def _check_finite(records: list[dict[str, Any]], maps: np.ndarray) -> None:
    """DataError naming the first image whose score or map is not finite (the same check and message
    as the fail-closed branch's, so that the two merge as one)."""
    n = len(records)
    finite = np.isfinite([r["score"] for r in records]) & np.isfinite(maps.reshape(n, -1)).all(axis=1)
    if not finite.all():  # metrics on NaN would be a traceback or, worse, a number
        first = int(np.flatnonzero(~finite)[0])
        raise DataError(
            f"{records[first]['path']}: the model gives a non-finite score or map (NaN or infinity) "
            f"on this test image ({int((~finite).sum())} of {n} such images); no metrics written"
        )


def decision_metrics(
    records: list[dict[str, Any]], maps: np.ndarray, masks: np.ndarray, image_threshold: float, pixel_threshold: float
) -> dict[str, Any]:
    """What the model's own thresholds decide on a labelled test set; sets ``decision`` in each record.

    An image is anomalous when its score is > ``image_threshold``; a pixel is a defect pixel when its map
    value is > ``pixel_threshold``. Returns ``image_threshold``, ``pixel_threshold``, ``confusion``
    (image counts ``true_positive``, ``false_positive``, ``true_negative``, ``false_negative``),
    ``false_alarm_rate`` (flagged good images / good images), ``recall`` (flagged bad / bad),
    ``precision`` (bad among flagged; None when nothing is flagged), ``per_defect_type``
    (``{type: {images, detected, recall}}``) and ``pixel``: ``fpr`` (defect pixels among all normal
    pixels of the test set), ``fpr_good_images`` (among the pixels of good images), ``recall`` (among
    mask pixels; None without masks). Rates over an empty group are None.
    """
    scores = np.array([r["score"] for r in records], dtype=np.float64)
    labels = np.array([r["label"] for r in records]) == 1
    flagged = scores > image_threshold
    for r, f in zip(records, flagged.tolist(), strict=True):
        r["decision"] = "anomalous" if f else "normal"
    tp, fp = int((flagged & labels).sum()), int((flagged & ~labels).sum())
    fn, tn = int((~flagged & labels).sum()), int((~flagged & ~labels).sum())
    per_type: dict[str, dict[str, Any]] = {}
    for r, f in zip(records, flagged.tolist(), strict=True):
        if r["label"] == 1:
            entry = per_type.setdefault(r["defect_type"], {"images": 0, "detected": 0})
            entry["images"] += 1
            entry["detected"] += int(f)
    for entry in per_type.values():
        entry["recall"] = entry["detected"] / entry["images"]
    defect_px = maps > pixel_threshold
    truth = masks.astype(bool)
    good = ~labels
    normal_px = int((~truth).sum())
    good_px = int(good.sum()) * int(np.prod(maps.shape[1:]))
    return {
        "image_threshold": float(image_threshold),
        "pixel_threshold": float(pixel_threshold),
        "confusion": {"true_positive": tp, "false_positive": fp, "true_negative": tn, "false_negative": fn},
        "false_alarm_rate": _rate(fp, fp + tn),
        "recall": _rate(tp, tp + fn),
        "precision": _rate(tp, tp + fp),
        "per_defect_type": dict(sorted(per_type.items())),
        "pixel": {
            "fpr": _rate(int((defect_px & ~truth).sum()), normal_px),
            "fpr_good_images": _rate(int(defect_px[good].sum()), good_px),
            "recall": _rate(int((defect_px & truth).sum()), int(truth.sum())),
            "normal_pixels": normal_px,
            "defect_pixels": int(truth.sum()),
        },
    }


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f} %"


def decisions_text(decisions: dict[str, Any]) -> str:
    """Lines printed by ``spotdiff test``: false alarms, recall (per defect type), precision, pixel rates."""
    c, px = decisions["confusion"], decisions["pixel"]
    good, bad = c["false_positive"] + c["true_negative"], c["true_positive"] + c["false_negative"]
    lines = [
        f"decisions at the model's image threshold {decisions['image_threshold']:.6g}:",
        (
            f"  false alarms {c['false_positive']} of {good} good image(s) ({_percent(decisions['false_alarm_rate'])}); "
            f"recall {c['true_positive']} of {bad} bad image(s) ({_percent(decisions['recall'])}); "
            f"precision {_percent(decisions['precision'])}"
        ),
    ]
    lines += [
        f"  {name}: {e['detected']} of {e['images']} detected ({_percent(e['recall'])})"
        for name, e in decisions["per_defect_type"].items()
    ]
    lines.append(
        f"at the pixel threshold {decisions['pixel_threshold']:.6g}: pixel FPR {_percent(px['fpr'])} "
        f"(good images {_percent(px['fpr_good_images'])}), pixel recall {_percent(px['recall'])}"
    )
    return "\n".join(lines)


def count_test_set(per_type: dict[str, Any], records: list[dict[str, Any]], masks: np.ndarray) -> dict[str, Any]:
    """What the metrics were measured on: image counts (normal, anomalous, per defect type) and
    pixel counts (all, anomalous). The positive fraction is the chance level of an AU-PR."""
    labels = np.array([r["label"] for r in records])
    types = [r["defect_type"] for r in records]
    return {
        "normal": int((labels == 0).sum()),
        "anomalous": int((labels == 1).sum()),
        "pixels": int(masks.size),
        "anomalous_pixels": int(np.count_nonzero(masks)),
        "per_defect_type": {
            t: sum(1 for x, y in zip(types, labels, strict=True) if x == t and y == 1) for t in per_type
        },
    }


def write_test_results(
    out_dir: str | os.PathLike[str],
    metrics: dict[str, Any],
    records: list[dict[str, Any]],
    maps: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``scores.csv`` (path,label,defect_type,score,decision) and optionally ``maps.npz``
    (float16 maps, key ``maps``, with ``paths``), each atomically. Returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"metrics": out / "metrics.json", "scores": out / "scores.csv"}
    write_json_atomic(written["metrics"], metrics)
    write_text_atomic(
        written["scores"], csv_text(SCORE_COLUMNS, [[r.get(k, "") for k in SCORE_COLUMNS] for r in records])
    )
    if maps is not None:
        written["maps"] = out / "maps.npz"
        with atomic_path(written["maps"]) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, maps=maps.astype(np.float16), paths=np.array([r["path"] for r in records]))
    return written


def open_test_set(
    model: Detector,
    model_dir: str | os.PathLike[str],
    *,
    good: Images | None = None,
    bad: Images | None = None,
    masks: Images | None = None,
    mask_suffix: str | None = None,
    mask_threshold: float | None = None,
    data: str | os.PathLike[str] | None = None,
    object: str | None = None,
    split: str = "1cls",
    split_csv: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    split_seed: int | None = None,
) -> tuple[AnomalyDataset, FolderSet | None]:
    """The test images of ``model`` (loaded from ``model_dir``, named in messages): plain folders (``good`` and ``bad``, optional ``masks``) or a
    dataset's test split (``data``, ``object``), at the model's input size.

    Returns the dataset and, for plain folders, the ``FolderSet`` (unmasked bad images, mask note;
    ``None`` for a dataset). Refuses (``ConfigError``) half a plain-folder pair, neither source, and
    mask options with a dataset. Logs a warning when ``object`` is not the one the model was fitted
    on, or when ``split_seed`` (default: the model's recorded seed) differs from the recorded one (a
    dataset without an official split may then overlap the training images)."""
    if model.image_size_ is None:
        raise ConfigError(f"{model_dir}: the detector is not fitted (no input size)")
    height, width = model.image_size_
    size = height if height == width else (height, width)
    if good is not None or bad is not None:
        if good is None or bad is None:
            raise ConfigError("plain-folder test needs both --good DIR and --bad DIR")
        return open_folders(
            good, bad, masks, image_size=size, name="test", mask_suffix=mask_suffix, mask_threshold=mask_threshold
        )
    if data is None or object is None:
        raise ConfigError("give --good DIR --bad DIR (plain folders) or --data ROOT with --object NAME")
    if masks is not None or mask_suffix is not None or mask_threshold is not None:
        raise ConfigError(
            "--masks, --mask-suffix and --mask-threshold are for plain folders (--good/--bad); "
            "a dataset's masks are read from its own layout"
        )
    source = model.data_source_ or {}
    fitted_on = source.get("object")
    if fitted_on and fitted_on != object:
        log.warning(
            f"warning: {model_dir} was fitted on object {fitted_on!r}, not {object!r}; "
            "its scores on another object are rarely meaningful"
        )
    recorded = source.get("split_seed", 0)
    seed = recorded if split_seed is None else split_seed
    if seed != recorded:
        log.warning(
            f"warning: --split-seed {seed} differs from the seed the model was fitted with ({recorded}); "
            "for a dataset without an official split, test images may then overlap the training images"
        )
    test = open_dataset(
        data, object, split=split, subset="test", image_size=size, split_csv=split_csv, skip_bad=skip_bad, seed=seed
    )
    return test, None
