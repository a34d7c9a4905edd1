"""Scoring of folders of new images (used by ``spotdiff predict``), streamed in batches.

Evaluation on labelled test sets is in :mod:`spotdiff.detect.evaluate`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spotdiff.data.listing import list_images
from spotdiff.data.loader import decode_workers
from spotdiff.detect.colour import (
    ColourScale,
    colour_scale,
    draw_mask_contour,
    normal_statistics,
    overlay_heatmap,
    scale_from_normals,
)
from spotdiff.detect.predict_output import PREDICT_COLUMNS
from spotdiff.detect.scoring import ERROR, ImageScorer, ScoredImage, binary_mask, overlay_picture
from spotdiff.errors import ConfigError, DataError, OutputError, SpotdiffError
from spotdiff.files import TMP_MARK, TMP_PREFIX, atomic_path
from spotdiff.progress import progress

log = logging.getLogger(__name__)

PIPELINE_DEPTH = 2
"""Batches whose overlays and masks may be waiting for the writer threads (bounds predict's memory)."""
PNG_COMPRESS_LEVEL = 1
"""zlib level of overlay and mask PNGs: lossless either way; level 1 encodes several times faster than
Pillow's default 6 for files about 10-30 % larger (our choice, for predict's throughput)."""
__all__ = [
    "PREDICT_COLUMNS",
    "collect_images",
    "draw_mask_contour",
    "overlay_heatmap",
    "predict_images",
    "write_result",
]


def collect_images(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and directories into image paths.

    Directories are searched recursively by ``spotdiff.data.list_images`` (image extensions,
    hidden files skipped, sorted). Explicit files (and links, dangling or not) are kept as given,
    images or not, so that ``predict`` reports an unreadable one in its own row instead of stopping.

    Raises:
        DataError: an input does not exist, a folder holds a link loop or reaches a file twice,
            or nothing was found.
    """
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():  # a folder without images is only an error if nothing is found at all;
            # a link loop or a file reached twice is refused (DataError), never a silently dropped folder
            paths.extend(list_images(item, recursive=True, allow_empty=True))
        elif item.exists() or item.is_symlink():  # a dangling link: an error row, like an unreadable file
            paths.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    if not paths:
        raise DataError(f"no image files found in {[str(i) for i in inputs]}")
    return paths


def _unique_name(stem: str, used: set[str]) -> str:
    name, n = f"{stem}.png", 1
    while name in used:
        name, n = f"{stem}_{n}.png", n + 1
    used.add(name)
    return name


def output_names(paths: Sequence[Path]) -> list[str]:
    """The overlay/mask file name of each input: ``<stem>.png``, ``<stem>_1.png``, ... for repeated
    stems, in input order (the same names on a resumed run)."""
    used: set[str] = set()
    return [_unique_name(p.stem, used) for p in paths]


@dataclass
class _Outputs:
    """What the writers need: folders (None = not written), the colour scale and the thresholds."""

    overlay_dir: Path | None
    mask_dir: Path | None
    scale: ColourScale | None
    threshold: float | None
    pixel_threshold: float | None


def _save_png(array: np.ndarray, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def write_result(result: ScoredImage, name: str, outputs: _Outputs) -> dict[str, Any]:
    """Write the mask (at the original image's size) and the overlay of one scored image; return its
    ``scores.csv`` row. Runs in a writer thread."""
    row: dict[str, Any] = {
        "path": str(result.path),
        "score": "" if result.score is None else result.score,
        "normalized_score": "" if result.normalized_score is None else result.normalized_score,
        "normal_percentile": "" if result.normal_percentile is None else result.normal_percentile,
        "decision": result.decision,
        "anomalous": "",
        "overlay": "",
        "mask": "",
        "threshold": "" if outputs.threshold is None else outputs.threshold,
        "pixel_threshold": "" if outputs.pixel_threshold is None else outputs.pixel_threshold,
        "error": result.error,
    }
    if result.decision == ERROR or result.score is None:
        return row
    if outputs.threshold is not None:
        row["anomalous"] = int(result.decision == "anomalous")
    if outputs.mask_dir is not None:
        mask = binary_mask(result, outputs.pixel_threshold)
        assert mask is not None
        _save_png(mask.astype(np.uint8) * 255, outputs.mask_dir / name)
        row["mask"] = str(outputs.mask_dir / name)
    if outputs.overlay_dir is not None and outputs.scale is not None:
        picture = overlay_picture(result, outputs.scale, outputs.threshold, outputs.pixel_threshold)
        if picture is not None:
            _save_png(picture, outputs.overlay_dir / name)
            row["overlay"] = str(outputs.overlay_dir / name)
    return row


def predict_images(
    model: Any,
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    threshold: float | None = None,
    batch_size: int | None = None,
    overlays: bool = True,
    masks: bool = False,
    pixel_threshold: float | None = None,
    num_workers: int | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Score image files; write ``scores.csv``, heat-map overlays and (``masks``) defect masks under ``out_dir``.

    A pipeline (``docs/deploy.md``, "Predict"): ``num_workers`` threads (None: ``decode_workers()``)
    decode and resize ahead of the model (:class:`~spotdiff.detect.scoring.ImageScorer`), the model
    runs on batches of ``batch_size`` in this thread, and as many writer threads render overlays and
    write masks behind it; at most ``PIPELINE_DEPTH`` batches wait for the writers, so memory is
    bounded by the pipeline's depth, not by the number of images. Output order and file names do
    not depend on the number of threads.

    Every image is converted to RGB (see ``load_image``) and resized to the model's image size, so
    mixed sizes are fine. ``threshold`` / ``pixel_threshold`` default to the model's calibration.
    Overlays (``overlays/<stem>.png``): the original at :func:`~spotdiff.detect.scoring.display_size`
    beside its heat map on the model's one colour scale (:func:`~spotdiff.detect.colour.colour_scale`),
    with a colour bar, both thresholds, the score, normalised score and decision; the outline of the
    defect mask on anomalous images only. Masks (``masks/<stem>.png``, 0/255) are written at the
    original image's size: map (bilinearly resized) > pixel threshold on an anomalous image, empty
    on a normal one (:func:`~spotdiff.detect.scoring.binary_mask`).

    Rows are kept as the run goes (:class:`~spotdiff.detect.predict_output.ScoresFile`):
    ``scores.partial.csv`` is appended per batch and renamed ``scores.csv`` when the run completes;
    ``resume`` skips the images an earlier run of the same ``out_dir`` scored. An unreadable image,
    or one whose score or map is not finite, is a row with decision ``error`` and an ``error``
    message; the rest are scored. An error in a writer ends the run (its exception is raised) with
    every row completed before it in ``scores.partial.csv``.

    Raises:
        ConfigError: ``out_dir`` inside a model directory or an input folder, a non-finite threshold,
            masks without a pixel threshold, a resume whose thresholds differ.
        OutputError: a scores file in ``out_dir`` that predict did not write, or a failed write.

    Returns:
        One row per input file, in input order, with the columns ``PREDICT_COLUMNS``: ``path``,
        ``score`` (raw), ``normalized_score`` (0.5 at the threshold; "" without calibration),
        ``normal_percentile``, ``decision`` (``anomalous``, ``normal``, ``no threshold``, ``error``),
        ``anomalous`` (1/0), ``threshold``, ``pixel_threshold``, ``overlay``, ``mask``, ``error``.
    """
    from spotdiff.detect.predict_output import ScoresFile, check_output_location

    scorer = ImageScorer(model, threshold, pixel_threshold, keep_display=overlays)
    if masks and scorer.pixel_threshold is None:
        raise ConfigError("binary masks need a pixel threshold: the model has no calibration; give --pixel-threshold")
    check_output_location(out_dir, inputs)
    paths = collect_images(inputs)
    out = Path(out_dir)
    names = dict(zip(map(str, paths), output_names(paths), strict=True))
    outputs = _Outputs(
        out / "overlays" if overlays else None,
        out / "masks" if masks else None,
        colour_scale(model, scorer.threshold),
        scorer.threshold,
        scorer.pixel_threshold,
    )
    targets = [d / n for d in (outputs.overlay_dir, outputs.mask_dir) if d is not None for n in names.values()]
    targets += _earlier_png_targets(out / "overlays", out / "masks")
    scores_file = ScoresFile(out, resume=resume)
    kept = scores_file.start(scorer.threshold, scorer.pixel_threshold, targets)
    for folder in (outputs.overlay_dir, outputs.mask_dir):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    todo = [p for p in paths if str(p) not in kept]
    step = batch_size or model.forward_batch
    writers = decode_workers(num_workers)
    try:
        _run_pipeline(scorer, todo, names, outputs, scores_file, step, num_workers, writers)
    finally:
        scores_file.close()
    return scores_file.finish([str(p) for p in paths])


def _earlier_png_targets(*folders: Path) -> list[Path]:
    """The PNGs that an interrupted earlier run was writing in ``folders`` (their ``.<name>.png.tmp-*``
    files are left by :func:`spotdiff.files.atomic_path`), so that they are cleaned whatever its inputs were."""
    found = []
    for folder in folders:
        if folder.is_dir():
            for entry in os.scandir(folder):
                name = entry.name
                if name.startswith(TMP_PREFIX) and TMP_MARK in name and name[: name.rindex(TMP_MARK)].endswith(".png"):
                    found.append(folder / name[len(TMP_PREFIX) : name.rindex(TMP_MARK)])
    return found


def _run_pipeline(
    scorer: ImageScorer,
    todo: Sequence[Path],
    names: dict[str, str],
    outputs: _Outputs,
    scores_file: Any,
    step: int,
    num_workers: int | None,
    writers: int,
) -> None:
    """Model batches in this thread; each batch's writes go to the writer pool, and its rows are
    appended in order once its writes are done. On any exception the rows of the writes that
    completed are appended before it propagates (a writer's unexpected exception becomes
    :class:`~spotdiff.errors.OutputError` naming the image)."""
    pending: deque[list[tuple[Path, Future[dict[str, Any]]]]] = deque()

    def drain(batch: list[tuple[Path, Future[dict[str, Any]]]]) -> None:
        rows = []
        try:
            for path, future in batch:
                try:
                    rows.append(future.result())
                except SpotdiffError:
                    raise
                except Exception as exc:  # a writer that died: end the run, naming the image
                    raise OutputError(f"{path}: writing its overlay/mask failed ({type(exc).__name__}: {exc})") from exc
        finally:
            if rows:
                scores_file.append(rows)

    pool = ThreadPoolExecutor(max_workers=max(1, writers), thread_name_prefix="spotdiff-write")
    try:
        batches = scorer.scored_batches(todo, step, num_workers)
        for results in progress(batches, desc="predicting", total=-(-len(todo) // step), unit="batch"):
            if outputs.overlay_dir is not None and outputs.scale is None:
                good = [(r.score, r.anomaly_map) for r in results if r.anomaly_map is not None]
                if good:  # a model directory without normal statistics: fixed from this first batch
                    outputs.scale = scale_from_normals(
                        normal_statistics(np.array([s for s, _ in good]), np.stack([m for _, m in good])), "first batch"
                    )
                    log.info(
                        f"warning: {len(good)} image(s) of the first batch fix the overlays' colour scale; "
                        "re-fit the model (or give --threshold) for a scale fixed by the model"
                    )
            if writers == 0:
                pending.append([(r.path, _completed(write_result, r, names[str(r.path)], outputs)) for r in results])
            else:
                pending.append([(r.path, pool.submit(write_result, r, names[str(r.path)], outputs)) for r in results])
            while len(pending) > PIPELINE_DEPTH:
                drain(pending.popleft())
        while pending:
            drain(pending.popleft())
    except BaseException:
        while pending:  # let the queued writes finish and keep every row whose files were written
            batch = pending.popleft()
            wait([f for _, f in batch])
            with contextlib.suppress(BaseException):
                drain([(p, f) for p, f in batch if not f.cancelled() and f.exception() is None])
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _completed(fn: Any, *args: Any) -> Future[dict[str, Any]]:
    """``fn(*args)`` run now, as a finished Future (the writers = 0 case)."""
    future: Future[dict[str, Any]] = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:  # noqa: BLE001 - re-raised by drain() like a pool's
        future.set_exception(exc)
    return future


def load_predictor(
    model_dir: str | os.PathLike[str],
    backend: str = "torch",
    onnx: str | os.PathLike[str] | None = None,
    device: str = "auto",
) -> Any:
    """The detector ``predict_images`` runs: the torch model of ``model_dir`` on ``device`` (``backend``
    "torch"), or its ONNX graph ``onnx`` (written by ``spotdiff export``) under onnxruntime on the CPU
    (``backend`` "onnxruntime"). Refuses (``ConfigError``) an unknown backend, onnxruntime without
    ``onnx``, and ``onnx`` with the torch backend."""
    if backend == "onnxruntime":
        if onnx is None:
            raise ConfigError("--backend onnxruntime needs --onnx FILE (written by `spotdiff export`)")
        from spotdiff.detect.onnx_runtime import OnnxDetector
        from spotdiff.threads import session_threads

        return OnnxDetector(model_dir, onnx, threads=session_threads())
    if backend != "torch":
        raise ConfigError(f"--backend {backend!r}: expected torch or onnxruntime")
    if onnx is not None:
        raise ConfigError("--onnx is only used with --backend onnxruntime")
    from spotdiff import detect  # the package's load_detector (one loader; tests substitute it there)
    from spotdiff.devices import resolve_device

    return detect.load_detector(model_dir, device=resolve_device(device))
