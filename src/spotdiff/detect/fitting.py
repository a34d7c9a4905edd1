"""Fit and calibrate in one call: `fit_folder` (plain folders, ``spotdiff fit --train``) and
`fit_dataset` (a dataset's training split, ``spotdiff fit --data --object``).

Both hold out a seeded share of the training images as normal validation images (or take
``val_good``), fit on the rest and calibrate thresholds and the colour scale on the held-out
images (`spotdiff.detect.calibration.calibrate`), so every model decides from images it was not
fitted on. Every input (folders, masks, overlaps by content, threshold options) is checked before
fitting starts. ``calibrate=False`` fits on every training image and stores no thresholds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spotdiff.data.dataset import AnomalyDataset, ImageRecord
from spotdiff.data.listing import list_images
from spotdiff.data.plain import (
    VAL_FRACTION,
    FolderSet,
    Images,
    check_image_headers,
    check_no_overlap,
    content_hashes,
    folder_records,
    holdout,
)
from spotdiff.detect.calibration import DEFAULT_FPR, Calibration, check_threshold_mode
from spotdiff.detect.calibration import calibrate as calibrate_model
from spotdiff.errors import ConfigError

Fitted = tuple[Any, Calibration | None, list[Path]]
"""``(model, calibration or None with calibrate=False, bad validation images without a mask)``."""


def fit_folder(
    model: Any,
    train: Images,
    val_good: Images | None = None,
    val_bad: Images | None = None,
    val_masks: Images | None = None,
    image_size: int | tuple[int, int] = 256,
    threshold_mode: str = "normal-fpr",
    target_fpr: float = DEFAULT_FPR,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    val_seed: int = 0,
    val_fraction: float = VAL_FRACTION,
    mask_suffix: str | None = None,
    mask_threshold: float | None = None,
    calibrate: bool = True,
) -> Fitted:
    """Fit ``model`` on a folder (or folders, or a list of image files) of good images and calibrate
    it; the Python twin of ``spotdiff fit --train``. See `fit_dataset` for the other arguments."""
    paths = list_images(train, recursive=True)
    dataset = AnomalyDataset(
        [ImageRecord(p, 0, source=str(p.parent)) for p in paths], image_size=image_size, name="train"
    )
    return fit_dataset(
        model,
        dataset,
        val_good,
        val_bad,
        val_masks,
        threshold_mode,
        target_fpr,
        threshold,
        pixel_threshold,
        val_seed,
        val_fraction,
        mask_suffix,
        mask_threshold,
        calibrate,
        held_from="training folder",
    )


def fit_dataset(
    model: Any,
    train: AnomalyDataset,
    val_good: Images | None = None,
    val_bad: Images | None = None,
    val_masks: Images | None = None,
    threshold_mode: str = "normal-fpr",
    target_fpr: float = DEFAULT_FPR,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    val_seed: int = 0,
    val_fraction: float = VAL_FRACTION,
    mask_suffix: str | None = None,
    mask_threshold: float | None = None,
    calibrate: bool = True,
    held_from: str = "training split",
) -> Fitted:
    """Fit ``model`` on the normal images of ``train`` and calibrate it on held-out normal images;
    the Python twin of ``spotdiff fit --data ROOT --object NAME``.

    Args:
        train: normal training images, e.g. ``open_dataset(root, obj, subset="train")``.
        val_good: normal validation folders; default: a seeded ``val_fraction`` of ``train``
            (seed ``val_seed``) held out (`spotdiff.data.plain.holdout`; byte-identical copies stay
            on one side).
        val_bad, val_masks, mask_suffix, mask_threshold: anomalous validation folders (one defect
            type per subfolder) and their masks (see `spotdiff.data.plain.folder_records`).
        threshold_mode, target_fpr, threshold, pixel_threshold: the threshold rule (see
            `spotdiff.detect.calibration`).
        calibrate: False fits on every training image and stores no calibration; validation and
            threshold arguments are then refused.

    Raises:
        ConfigError: a threshold option that does not fit the mode, or validation options with
            ``calibrate=False``.
        DataError: folders, masks or overlaps (training vs normal validation vs bad validation,
            by content) that are refused; too few images to hold out.
    """
    train_paths = [Path(p) for p in train.paths]
    if not calibrate:
        given = [
            name
            for name, value in (
                ("--val-good", val_good),
                ("--val-bad", val_bad),
                ("--val-masks", val_masks),
                ("--threshold", threshold),
                ("--pixel-threshold", pixel_threshold),
            )
            if value is not None
        ]
        if given or threshold_mode != "normal-fpr":
            raise ConfigError(
                f"--no-calibration fits without thresholds; it cannot be combined with "
                f"{', '.join(given) or '--threshold-mode'}"
            )
        check_image_headers(train_paths)
        model.fit(train)
        return model, None, []
    check_threshold_mode(threshold_mode, val_bad is not None, threshold, target_fpr)
    hashes = content_hashes(train_paths, check_headers=True)  # bombs and broken links refused before the fit
    if val_good is not None:
        fit_set = train
        val_paths = list_images(val_good, recursive=True)
        hashes.update(content_hashes(val_paths, check_headers=True))
        check_no_overlap(train_paths, val_paths, "training", "normal validation", hashes)
        good_set = AnomalyDataset([ImageRecord(p, 0) for p in val_paths], image_size=train.image_size, name="val good")
        source: dict[str, Any] = {"validation": "given", "n_val_good": len(val_paths)}
    else:
        fit_idx, val_idx = holdout(train_paths, val_fraction, val_seed, hashes, where=train.name or "training images")
        fit_set, good_set = train.subset(fit_idx), train.subset(val_idx)
        val_paths = [train_paths[i] for i in val_idx]
        source = {
            "validation": f"held out of {held_from}",
            "val_fraction": val_fraction,
            "val_seed": val_seed,
            "n_val_good": len(val_idx),
        }
    bad: FolderSet | None = None
    if val_bad is not None:
        bad = folder_records(None, val_bad, val_masks, mask_suffix, mask_threshold, what="validation")
        bad_paths = [r.image for r in bad.records]
        hashes.update(content_hashes(bad_paths))
        check_no_overlap(val_paths, bad_paths, "normal validation", "bad validation", hashes)
        check_no_overlap(train_paths, bad_paths, "training", "bad validation", hashes)
        if bad.mask_note:
            source["masks"] = bad.mask_note
    elif val_masks is not None:
        raise ConfigError("--val-masks needs --val-bad (the bad validation images the masks belong to)")
    model.fit(fit_set)
    bad_set = AnomalyDataset(bad.records, image_size=model.image_size_, name="val bad") if bad else None
    cal = calibrate_model(
        model,
        good_set,
        bad_set,
        threshold_mode,
        target_fpr,
        threshold,
        pixel_threshold,
        source,
        has_masks=bad is not None and len(bad.unmasked) < len(bad.records),
    )
    return model, cal, bad.unmasked if bad else []
