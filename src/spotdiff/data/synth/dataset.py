"""Write the synthetic dataset in the raw VisA layout, with VisA-style split CSVs and id2class.json."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from spotdiff.errors import ConfigError, DataError
from spotdiff.files import default_mode, write_json_atomic
from spotdiff.progress import progress
from spotdiff.tabular import csv_text

from ._base import RenderedSample, SynthObject, render_sample
from .capsules import CapsulesSynth
from .cashew import CashewSynth
from .pcb import PcbSynth

log = logging.getLogger(__name__)

# Bump whenever the generator's output changes for the same arguments.
SYNTH_VERSION = 1
MARKER = "SYNTH.json"
JPEG_QUALITY = 95
SPLITS = ("1cls", "2cls_fewshot", "2cls_highshot")
CSV_COLUMNS = ("object", "split", "label", "image", "mask")
# Images per object at scale 1.0. Normal counts scale linearly; anomaly counts with sqrt(scale),
# so that small test datasets still hold enough anomalies for k-shot pools (see docs/synth.md).
NORMALS_AT_SCALE_1 = 160
ANOMALIES_AT_SCALE_1 = 50
MIN_PER_CLASS = 5
MAX_SCALE = 50.0
MAX_NORMAL = 20000
VISA_FRAME = (1500, 1000)
"""(width, height) of ``--frame visa``: about the size of a VisA image (VisA's objects range from
about 1274 x 976 to 1562 x 960 px; 1500 x 1000 is our round figure)."""
FRAME_NOISE = 2.0
"""Std (grey levels) of the sensor noise added per pixel after upscaling to ``frame``, so the JPEG
carries full-resolution detail (and costs what a photo costs to decode) rather than a smooth upscale."""

OBJECTS: dict[str, SynthObject] = {obj.name: obj for obj in (PcbSynth(), CapsulesSynth(), CashewSynth())}


def image_counts(scale: float) -> tuple[int, int]:
    """(normal, anomalous) images per object at ``scale``."""
    normal = max(MIN_PER_CLASS, round(NORMALS_AT_SCALE_1 * scale))
    anomalous = max(MIN_PER_CLASS, round(ANOMALIES_AT_SCALE_1 * math.sqrt(scale)))
    return normal, anomalous


def _n_train(n: int, fraction: float) -> int:
    """round(fraction * n), but at least one train and one test item when n >= 2."""
    return min(max(round(fraction * n), 1), n - 1) if n >= 2 else n


def split_assignment(seed: int, name: str, split: str, label: str, n: int) -> np.ndarray:
    """Boolean array: which of the ``n`` items of ``label`` are in the train part of ``split``.

    1cls: 90 % of the normals train, all anomalies test; 2cls_highshot: 60 % of each label train;
    2cls_fewshot: 20 % of each label train. The choice is a seeded random permutation.
    """
    fraction = {
        "1cls": {"normal": 0.9, "anomaly": 0.0},
        "2cls_highshot": {"normal": 0.6, "anomaly": 0.6},
        "2cls_fewshot": {"normal": 0.2, "anomaly": 0.2},
    }[split][label]
    n_train = 0 if fraction == 0.0 else _n_train(n, fraction)
    rng = np.random.default_rng([seed, SPLITS.index(split), int(label == "anomaly"), *name.encode()])
    train = np.zeros(n, dtype=bool)
    train[rng.permutation(n)[:n_train]] = True
    return train


def _params(
    seed: int,
    scale: float,
    image_size: int,
    objects: Sequence[str],
    normal: int | None = None,
    frame: tuple[int, int] | None = None,
) -> dict:
    params = {
        "generator": "spotdiff.data.synth",
        "version": SYNTH_VERSION,
        "seed": seed,
        "scale": scale,
        "image_size": image_size,
        "objects": list(objects),
    }
    # recorded only when set, so outputs written before these options existed stay recognised
    if normal is not None:
        params["normal"] = normal
    if frame is not None:
        params["frame"] = list(frame)
    return params


def _check_extras(normal: int | None, frame: tuple[int, int] | None) -> None:
    if normal is not None and (
        not isinstance(normal, int) or isinstance(normal, bool) or not MIN_PER_CLASS <= normal <= MAX_NORMAL
    ):
        raise ConfigError(f"synth: normal must be an integer in [{MIN_PER_CLASS}, {MAX_NORMAL}], got {normal!r}")
    if frame is not None and (len(frame) != 2 or not all(isinstance(v, int) and 32 <= v <= 4096 for v in frame)):
        raise ConfigError(f"synth: frame must be (width, height) with integers in [32, 4096], got {frame!r}")


def _to_frame(sample: RenderedSample, frame: tuple[int, int], rng: np.random.Generator) -> RenderedSample:
    """Upscale a square sample to ``frame`` = (width, height): image bicubic plus ``FRAME_NOISE``
    sensor noise at full resolution, mask nearest-neighbour (so it still marks exactly the defect)."""
    image = np.asarray(
        Image.fromarray(sample.image, mode="RGB").resize(frame, Image.Resampling.BICUBIC), dtype=np.float32
    )
    image += rng.standard_normal(image.shape, dtype=np.float32) * FRAME_NOISE
    mask = np.asarray(Image.fromarray(sample.mask, mode="L").resize(frame, Image.Resampling.NEAREST))
    return RenderedSample(
        image=np.clip(image.round(), 0, 255).astype(np.uint8), mask=mask, defect_ids=sample.defect_ids
    )


def _check_args(seed: int, scale: float, image_size: int, objects: Sequence[str] | None) -> list[str]:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"synth: seed must be a non-negative integer, got {seed!r}")
    if not (isinstance(scale, (int, float)) and 0 < scale <= MAX_SCALE and math.isfinite(scale)):
        raise ConfigError(f"synth: scale must be in (0, {MAX_SCALE}], got {scale!r}")
    if not isinstance(image_size, int) or not 32 <= image_size <= 1024:
        raise ConfigError(f"synth: image_size must be an integer in [32, 1024], got {image_size!r}")
    names = list(OBJECTS) if objects is None else [objects] if isinstance(objects, str) else list(objects)
    unknown = [n for n in names if n not in OBJECTS]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigError(f"synth: objects must be distinct names among {sorted(OBJECTS)}, got {names}")
    return names


def _read_marker(out: Path) -> dict | None:
    """The parameters of a previous synth output in ``out``, None if ``out`` is empty or absent.

    Raises DataError when ``out`` is a file or a non-empty directory without a valid marker.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()):
        return None
    marker = out / MARKER
    try:
        params = json.loads(marker.read_text(encoding="utf-8"))
        if not isinstance(params, dict) or params.get("generator") != "spotdiff.data.synth":
            raise ValueError("not written by spotdiff synth")
        if not isinstance(params.get("files", {}), dict):
            raise ValueError("malformed file list")
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{out}: refusing to write into a non-empty directory that is not a spotdiff synth "
            f"output ({marker.name} missing or invalid: {exc})"
        ) from exc
    return params


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(image, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        Image.fromarray(image, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write_object(
    stage: Path,
    obj: SynthObject,
    seed: int,
    scale: float,
    size: int,
    files: dict[str, str],
    normal: int | None = None,
    frame: tuple[int, int] | None = None,
) -> dict[str, list[dict]]:
    """Render one object into ``stage``; return its rows per label, and record file hashes in ``files``."""
    n_normal, n_anomalous = image_counts(scale)
    n_normal = n_normal if normal is None else normal
    base = Path(obj.name) / "Data"
    rows: dict[str, list[dict]] = {"normal": [], "anomaly": []}
    anno: list[dict] = []
    jobs = [(False, i) for i in range(n_normal)] + [(True, i) for i in range(n_anomalous)]
    for anomalous, index in progress(jobs, desc=f"synth {obj.name}"):
        sample = render_sample(obj, seed, index, anomalous, size)
        if frame is not None:
            sample = _to_frame(sample, frame, np.random.default_rng([seed, *obj.name.encode(), int(anomalous), index]))
        if anomalous:
            image_rel = (base / "Images" / "Anomaly" / f"{index:03d}.JPG").as_posix()
            mask_rel = (base / "Masks" / "Anomaly" / f"{index:03d}.png").as_posix()
            _put(stage, mask_rel, _encode(sample.mask, "PNG"), files)
            label = ",".join(obj.defect_names[i - 1] for i in sample.defect_ids)
        else:
            image_rel = (base / "Images" / "Normal" / f"{index:04d}.JPG").as_posix()
            mask_rel, label = "", "normal"
        _put(stage, image_rel, _encode(sample.image, "JPEG"), files)
        anno.append({"image": image_rel, "label": label, "mask": mask_rel})
        rows["anomaly" if anomalous else "normal"].append({"image": image_rel, "mask": mask_rel})
    _put(stage, f"{obj.name}/image_anno.csv", _csv(("image", "label", "mask"), anno), files)
    return rows


def _put(stage: Path, rel: str, data: bytes, files: dict[str, str]) -> None:
    path = stage / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    files[rel] = hashlib.sha256(data).hexdigest()


def _csv(columns: Sequence[str], rows: list[dict]) -> bytes:
    return csv_text(columns, [[row.get(k, "") for k in columns] for row in rows]).encode("utf-8")


def _split_rows(seed: int, split: str, name: str, rows: dict[str, list[dict]]) -> list[dict]:
    """Rows of one object in the official order: train normal, train anomaly, test normal, test anomaly."""
    parts: dict[tuple[str, str], list[dict]] = {}
    for label, items in rows.items():
        train = split_assignment(seed, name, split, label, len(items))
        for item, is_train in zip(items, train):
            part = "train" if is_train else "test"
            parts.setdefault((part, label), []).append(
                {"object": name, "split": part, "label": label, "image": item["image"], "mask": item["mask"]}
            )
    order = [("train", "normal"), ("train", "anomaly"), ("test", "normal"), ("test", "anomaly")]
    return [row for key in order for row in parts.get(key, [])]


def generate(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    scale: float = 1.0,
    image_size: int = 256,
    objects: Sequence[str] | None = None,
    normal: int | None = None,
    frame: tuple[int, int] | None = None,
) -> Path:
    """Write the synthetic VisA-format dataset to ``out_dir`` and return its path.

    Layout (paths relative to ``out_dir``), as in the raw VisA download:
    ``<object>/Data/Images/{Normal/NNNN.JPG, Anomaly/NNN.JPG}``, ``<object>/Data/Masks/Anomaly/NNN.png``
    (uint8 class ids, 0 = background), ``<object>/image_anno.csv`` (image,label,mask),
    ``split_csv/{1cls,2cls_fewshot,2cls_highshot}.csv`` (object,split,label,image,mask),
    ``id2class.json`` and the marker ``SYNTH.json`` (parameters and SHA-256 of every file).

    ``normal`` overrides the number of normal images per object (anomalies still follow ``scale``);
    ``frame = (width, height)`` writes every image at that size: rendered at ``image_size``, upscaled
    (bicubic) with full-resolution sensor noise, masks upscaled nearest-neighbour (a benchmark input
    that costs what VisA's large JPEGs cost to decode, e.g. ``frame=VISA_FRAME``; not more detail).

    The output is a pure function of (seed, scale, image_size, objects, normal, frame): re-running with the same
    arguments on an existing output is a no-op. The dataset is built in a temporary directory
    beside ``out_dir`` and moved into place at the end, so an interrupted run leaves nothing at
    ``out_dir``. Raises DataError if ``out_dir`` is a non-empty directory that is not a previous
    synth output, ConfigError for invalid arguments.
    """
    names = _check_args(seed, scale, image_size, objects)
    _check_extras(normal, frame)
    frame = None if frame is None else (int(frame[0]), int(frame[1]))
    out = Path(out_dir)
    params = _params(int(seed), float(scale), image_size, names, normal, frame)
    previous = _read_marker(out)
    keys = {*params, "normal", "frame"}
    if (
        previous is not None
        and {k: previous.get(k) for k in keys} == {k: params.get(k) for k in keys}
        and all((out / rel).is_file() for rel in previous.get("files", {}))
    ):
        log.info(f"synth: {out} already holds this dataset (seed={seed}, scale={scale}); nothing to do")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        stage.chmod(default_mode(directory=True))  # mkdtemp makes it private
        files: dict[str, str] = {}
        split_rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
        id2class: dict[str, dict[str, str]] = {}
        for name in names:
            obj = OBJECTS[name]
            rows = _write_object(stage, obj, int(seed), float(scale), image_size, files, normal, frame)
            for split in SPLITS:
                split_rows[split] += _split_rows(int(seed), split, name, rows)
            id2class[name] = {"0": "BACKGROUND", **{str(i + 1): n for i, n in enumerate(obj.defect_names)}}
        for split in SPLITS:
            _put(stage, f"split_csv/{split}.csv", _csv(CSV_COLUMNS, split_rows[split]), files)
        # same formatting as the official id2class.json (indent 1, no trailing newline)
        _put(stage, "id2class.json", json.dumps(id2class, indent=1).encode("utf-8"), files)
        write_json_atomic(stage / MARKER, {**params, "files": dict(sorted(files.items()))})
        _swap_into_place(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    n_normal, n_anomalous = image_counts(scale)
    n_normal = n_normal if normal is None else normal
    log.info(
        f"synth: wrote {len(names) * (n_normal + n_anomalous)} images ({len(names)} objects x "
        f"{n_normal} normal + {n_anomalous} anomalous) to {out}"
    )
    return out


def _swap_into_place(stage: Path, out: Path) -> None:
    """Move the finished ``stage`` directory to ``out`` (replacing an empty dir or an old synth output)."""
    if out.exists() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "data")
        try:
            os.replace(stage, out)
        except BaseException:
            os.replace(old / "data", out)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)  # rename(2) replaces an empty directory atomically
