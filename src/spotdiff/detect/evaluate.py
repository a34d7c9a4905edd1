"""Evaluation of a fitted detector on a labelled test set (used by ``spotdiff test``).

Streams in batches: memory holds one batch of images plus the maps needed by pixel metrics
(``N x H x W`` float32 for the test set).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from spotdiff.data.loader import batches, decode_workers
from spotdiff.detect.base import Detector
from spotdiff.errors import DataError
from spotdiff.files import atomic_path, write_json_atomic, write_text_atomic
from spotdiff.progress import progress
from spotdiff.tabular import csv_text

SCORE_COLUMNS = ("path", "label", "defect_type", "score")


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
    write_text_atomic(written["scores"], csv_text(SCORE_COLUMNS, [[r.get(k, "") for k in SCORE_COLUMNS] for r in records]))
    if maps is not None:
        written["maps"] = out / "maps.npz"
        with atomic_path(written["maps"]) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, maps=maps.astype(np.float16), paths=np.array([r["path"] for r in records]))
    return written
