"""``spotdiff prepare``: copy raw VisA into the layout of the official ``prepare_data.py``.

For each split CSV row (paths relative to the VisA root):

- the image is copied byte for byte to ``<out>/<split>/<object>/<train|test>/<good|bad>/<basename>``;
- ``1cls``: the mask of each *test* anomalous row is binarised (nonzero -> 255, 8-bit grayscale
  PNG) to ``<out>/<split>/<object>/ground_truth/bad/<mask basename>``;
- ``2cls_fewshot`` / ``2cls_highshot``: the mask of *every* anomalous row is binarised to
  ``<out>/<split>/<object>/ground_truth/<train|test>/bad/<mask basename>``.

Beyond the official script: every row is validated (files exist, images and masks decode,
mask size = image size) before anything is written; work runs on a thread pool; a file whose
destination already holds the same bytes is left alone (so a rerun writes nothing); every file
is written atomically and a rerun deletes the temporary files of an interrupted run; no
destination may resolve outside ``out`` and no source outside ``visa_root``.
"""

from __future__ import annotations

import filecmp
import io
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from spotdiff.data.dataset import default_workers
from spotdiff.data.io import load_image, load_mask
from spotdiff.data.splits import OFFICIAL_SPLITS, SplitRow, read_split_csv, resolve_inside
from spotdiff.data.visa import split_csv_path
from spotdiff.errors import DataError
from spotdiff.files import atomic_path, remove_stale_temp_files, write_bytes_atomic
from spotdiff.progress import progress

MAX_ERRORS_SHOWN = 10


@dataclass
class PrepareReport:
    """What `prepare_visa` did. ``*_skipped`` counts destinations that already had the right bytes."""

    split: str
    out_dir: Path
    objects: list[str] = field(default_factory=list)
    images_written: int = 0
    images_skipped: int = 0
    masks_written: int = 0
    masks_skipped: int = 0

    @property
    def written(self) -> int:
        return self.images_written + self.masks_written

    @property
    def skipped(self) -> int:
        return self.images_skipped + self.masks_skipped

    def summary(self) -> str:
        return (
            f"{self.split}: {len(self.objects)} object(s) -> {self.out_dir}: "
            f"{self.images_written + self.images_skipped} images, {self.masks_written + self.masks_skipped} masks; "
            f"{self.written} file(s) written, {self.skipped} already up to date"
        )


@dataclass(frozen=True)
class CopyJob:
    """One output file: a byte-for-byte image copy, or (``is_mask``) a binarised mask."""

    row: SplitRow
    src: Path
    dst: Path
    is_mask: bool


def is_two_class(split: str) -> bool:
    return split != "1cls"


def skeleton_dirs(split: str, object_dir: Path) -> list[Path]:
    """The folders the official script creates for one object, even when they stay empty."""
    if is_two_class(split):
        rel = ["train/good", "train/bad", "test/good", "test/bad", "ground_truth/train/bad", "ground_truth/test/bad"]
    else:
        rel = ["train/good", "test/good", "test/bad", "ground_truth/bad"]
    return [object_dir / r for r in rel]


def plan_jobs(rows: list[SplitRow], split: str, visa_root: Path, out: Path) -> list[CopyJob]:
    """Every output file for ``rows`` under ``out/<split>`` (official rules, module docstring).

    Raises:
        DataError: two rows map to the same destination, a destination resolves outside ``out``,
            or a source resolves outside ``visa_root`` (a symlink pointing elsewhere).
    """
    base = out / split
    out_resolved = out.resolve()
    root_resolved = visa_root.resolve()
    jobs: list[CopyJob] = []
    owner: dict[Path, SplitRow] = {}
    for r in rows:
        label_dir = "bad" if r.is_anomaly else "good"
        obj_dir = base / r.object
        src = resolve_inside(visa_root, r.image, r.where, "image", root_resolved)
        jobs.append(CopyJob(r, src, obj_dir / r.split / label_dir / Path(r.image).name, False))
        if r.is_anomaly and (is_two_class(split) or r.split == "test"):
            gt = obj_dir / "ground_truth" / r.split / "bad" if is_two_class(split) else obj_dir / "ground_truth" / "bad"
            src = resolve_inside(visa_root, r.mask, r.where, "mask", root_resolved)
            jobs.append(CopyJob(r, src, gt / Path(r.mask).name, True))
    for job in jobs:
        if not job.dst.resolve().is_relative_to(out_resolved):
            raise DataError(f"{job.row.where}: destination {job.dst} resolves outside the output folder {out}")
        first = owner.setdefault(job.dst, job.row)
        if first is not job.row:
            raise DataError(f"{job.row.where}: destination {job.dst} is also written by row {first.row}")
    return jobs


def binarised_mask_png(mask: np.ndarray) -> bytes:
    """``(H, W)`` class-id mask -> PNG bytes of an 8-bit grayscale image, 255 where nonzero, else 0."""
    buf = io.BytesIO()
    Image.fromarray(np.where(mask != 0, 255, 0).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _validate_row(row: SplitRow, visa_root: Path) -> tuple[bytes | None, str | None]:
    """Decode the row's image (and mask); return (binarised mask PNG or None, error or None)."""
    try:
        img = load_image(visa_root / row.image)
        if not row.mask:
            return None, None
        mask = load_mask(visa_root / row.mask)
        w, h = img.size
        if mask.shape != (h, w):
            raise DataError(
                f"mask {visa_root / row.mask} is {mask.shape[1]}x{mask.shape[0]} but image "
                f"{visa_root / row.image} is {w}x{h} (width x height)"
            )
        return binarised_mask_png(mask), None
    except DataError as exc:
        return None, f"{row.where}: {exc}"


def _write(job: CopyJob, mask_png: bytes | None) -> bool:
    """Write one destination unless it already holds the right bytes; True if written."""
    try:
        return _write_unchecked(job, mask_png)
    except OSError as exc:  # disk full, permissions, a folder in the way, ...
        reason = exc.strerror or str(exc)
        raise DataError(f"{job.dst}: cannot write ({reason}) for {job.row.where}") from exc


def _write_unchecked(job: CopyJob, mask_png: bytes | None) -> bool:
    dst = job.dst
    if job.is_mask:
        assert mask_png is not None
        if dst.is_file() and dst.stat().st_size == len(mask_png) and dst.read_bytes() == mask_png:
            return False
        write_bytes_atomic(dst, mask_png)
        return True
    if dst.is_file() and dst.stat().st_size == job.src.stat().st_size and filecmp.cmp(job.src, dst, shallow=False):
        return False
    with atomic_path(dst) as tmp:
        shutil.copyfile(job.src, tmp)
    return True


def prepare_visa(
    visa_root: str | os.PathLike[str],
    split: str,
    out: str | os.PathLike[str],
    split_csv: str | os.PathLike[str] | None = None,
    workers: int | None = None,
) -> PrepareReport:
    """Write ``<out>/<split>/`` exactly as the official VisA ``prepare_data.py`` does.

    Reads ``split_csv`` or ``<visa_root>/split_csv/<split>.csv``. Validation decodes every
    image and mask once; copying reads each file again (and each existing destination, to
    compare bytes). ``workers``: thread count, default min(8, CPU count).

    Raises:
        DataError: bad split name, CSV row, image or mask (all problems found are listed, each
            naming its CSV row and file); nothing is written in that case.
    """
    if split not in OFFICIAL_SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(OFFICIAL_SPLITS)}")
    visa_root, out = Path(visa_root), Path(out)
    if visa_root.is_file():
        raise DataError(
            f"{visa_root}: is a file, not a folder; prepare reads an extracted VisA root and never "
            "unpacks archives (extract it first, e.g. tar -xf)"
        )
    if not visa_root.is_dir():
        raise DataError(f"{visa_root}: VisA root not found")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: output path exists and is not a folder")
    rows = read_split_csv(split_csv_path(visa_root, split, split_csv))
    if not rows:
        raise DataError(f"{split_csv_path(visa_root, split, split_csv)}: split CSV has no rows")
    workers = workers or default_workers()
    jobs = plan_jobs(rows, split, visa_root, out)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        checked = list(
            progress(pool.map(lambda r: _validate_row(r, visa_root), rows), desc=f"validating {split}", total=len(rows))
        )
    errors = [err for _, err in checked if err is not None]
    if errors:
        shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise DataError(f"{len(errors)} of {len(rows)} row(s) failed validation; nothing was written:\n  {shown}{more}")
    mask_png = {row.image: png for row, (png, _) in zip(rows, checked) if png is not None}

    objects = sorted({r.object for r in rows})
    for obj in objects:
        for d in skeleton_dirs(split, out / split / obj):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DataError(f"{d}: cannot create folder ({exc})") from exc
    try:  # temp files of an interrupted earlier run (kill -9, power loss) are never output
        remove_stale_temp_files(job.dst for job in jobs)
    except OSError as exc:
        raise DataError(f"{out / split}: cannot remove stale temporary files ({exc})") from exc
    report = PrepareReport(split=split, out_dir=out / split, objects=objects)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = progress(
            pool.map(lambda j: _write(j, mask_png.get(j.row.image) if j.is_mask else None), jobs),
            desc=f"writing {split}",
            total=len(jobs),
        )
        for job, wrote in zip(jobs, results):
            if job.is_mask:
                report.masks_written += wrote
                report.masks_skipped += not wrote
            else:
                report.images_written += wrote
                report.images_skipped += not wrote
    return report
