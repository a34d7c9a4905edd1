"""The output folder of ``predict``: where it may be, and a scores file that keeps what was computed.

* **Where**: ``--out`` may not be inside a model directory (its files would mix with the model's)
  nor inside one of the input folders (the next run would score its own overlays):
  :func:`check_output_location`, also used by ``export --out``.
* **Scores, kept per batch**: rows are appended to ``scores.partial.csv`` after each batch (flushed
  and fsynced) once that batch's overlays and masks are written, so every row names files that
  exist. When the run completes, the rows are written in input order to ``scores.csv`` (atomically)
  and the partial file is removed: a ``scores.partial.csv`` means the run did not complete.
* **Earlier runs**: a ``scores.csv`` (or an unfinished ``scores.partial.csv``) that ``predict`` wrote
  before is moved aside to ``scores.previous.csv`` (``scores.previous.partial.csv``) before anything
  new is written; a file of that name that ``predict`` did not write (another header) is never
  touched: the run is refused. Leftover ``.<name>.tmp-*`` files of an interrupted run are removed.
* **Resume**: ``--resume`` keeps the scored rows of the earlier run's file (the partial file, else
  ``scores.csv``), re-scores its error rows and the images without a row, and refuses to mix runs
  whose thresholds differ.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from spotdiff.errors import ConfigError, OutputError
from spotdiff.files import output_error, remove_stale_temp_files, write_text_atomic

log = logging.getLogger(__name__)


PREDICT_COLUMNS = (
    "path",
    "score",
    "normalized_score",
    "normal_percentile",
    "decision",
    "anomalous",
    "threshold",
    "pixel_threshold",
    "overlay",
    "mask",
    "error",
)
"""Columns of ``scores.csv`` written by ``predict``."""
OLD_PREDICT_COLUMNS = (
    "path",
    "score",
    "normalized_score",
    "decision",
    "anomalous",
    "threshold",
    "overlay",
    "mask",
    "error",
)
"""The header of ``scores.csv`` before ``normal_percentile`` (spotdiff <= 0.x): still recognised as ours."""
SCORES = "scores.csv"
PARTIAL = "scores.partial.csv"
PREVIOUS = "scores.previous.csv"
PREVIOUS_PARTIAL = "scores.previous.partial.csv"
MODEL_MARKERS = ("config.json", "manifest.json")
"""A folder holding both is a model directory (``spotdiff.detect.store``)."""


def _is_model_dir(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MODEL_MARKERS)


def check_output_location(
    out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]] = (), option: str = "--out"
) -> None:
    """ConfigError when ``out`` (a folder or a file) is inside a model directory (or is one), or
    inside one of the input folders ``inputs`` (or is one). Paths are compared resolved (symlinks followed)."""
    target = Path(out).resolve()
    for folder in (target, *target.parents):
        if _is_model_dir(folder):
            raise ConfigError(
                f"{option} {out} is inside the model directory {folder}: its files would mix with "
                "the model's (or overwrite them); choose a path outside it"
            )
    for item in inputs:
        source = Path(item).resolve()
        if source.is_dir() and (target == source or source in target.parents):
            raise ConfigError(
                f"{option} {out} is inside the input folder {item}: a later run would score its own "
                "overlays; choose an output folder outside the inputs"
            )


def _header(path: Path) -> tuple[str, ...] | None:
    """The CSV header of ``path``, None when it is empty or unreadable as text."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return tuple(next(csv.reader(fh), ()))
    except (UnicodeDecodeError, csv.Error):
        return None


def _ours(path: Path) -> bool:
    return path.is_file() and _header(path) in (PREDICT_COLUMNS, OLD_PREDICT_COLUMNS)


def _read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a scores file; a last line cut by a kill (fewer fields) is dropped."""
    with open(path, newline="", encoding="utf-8") as fh:
        text = fh.read()
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(complete)))
    return [r for r in rows if None not in r.values() and None not in r]


def _csv_line(row: dict[str, Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(
        ["" if row.get(k) is None else row.get(k, "") for k in PREDICT_COLUMNS]
    )
    return buf.getvalue()


class ScoresFile:
    """``scores.partial.csv`` while the run lasts, ``scores.csv`` when it completes (module docstring).

    Args:
        out: the output folder.
        resume: keep the rows of an earlier run (see :meth:`start`).
    """

    def __init__(self, out: str | os.PathLike[str], resume: bool = False) -> None:
        self.out = Path(out)
        self.resume = resume
        self.partial = self.out / PARTIAL
        self.final = self.out / SCORES
        self._fh: io.TextIOWrapper | None = None

    def start(
        self, threshold: float | None, pixel_threshold: float | None, outputs: Iterable[Path] = ()
    ) -> dict[str, dict[str, str]]:
        """Prepare the folder: refuse files not ours, move earlier runs' files aside (or, with
        ``resume``, keep their scored rows), remove leftover temporary files of ``outputs`` (and of the
        scores files). Returns the kept rows by path (empty without ``resume``)."""
        for path in (self.final, self.partial, self.out / PREVIOUS, self.out / PREVIOUS_PARTIAL):
            if path.exists() and not _ours(path):
                raise OutputError(
                    f"{path}: exists and was not written by spotdiff predict; "
                    "choose another --out (nothing was changed)"
                )
        self.out.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temp_files([self.final, self.partial, *outputs])
        if removed:
            log.info(f"removed {len(removed)} temporary file(s) left by an interrupted run")
        kept: dict[str, dict[str, str]] = {}
        if self.resume:
            source = self.partial if self.partial.exists() else self.final if self.final.exists() else None
            if source is not None:
                kept = {r["path"]: r for r in _read_rows(source) if r.get("decision") != "error" and not r.get("error")}
                self._check_same_run(kept.values(), source, threshold, pixel_threshold)
                log.info(f"resuming: {len(kept)} image(s) already scored in {source.name}")
        else:
            for path, aside in ((self.final, PREVIOUS), (self.partial, PREVIOUS_PARTIAL)):
                if path.exists():
                    os.replace(path, self.out / aside)
                    hint = " (it had not completed: --resume would have continued it)" if path == self.partial else ""
                    log.info(f"moved the earlier run's {path.name} to {aside}{hint}")
        text = "".join(_csv_line(r) for r in kept.values())
        write_text_atomic(self.partial, ",".join(PREDICT_COLUMNS) + "\n" + text)
        if self.final.exists():  # resumed from a complete file: it is rewritten at the end
            os.replace(self.final, self.out / PREVIOUS)
        try:
            self._fh = open(self.partial, "a", newline="", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        except OSError as exc:
            raise output_error(self.partial, exc) from exc
        return kept

    @staticmethod
    def _check_same_run(
        rows: Iterable[dict[str, str]], source: Path, threshold: float | None, pixel_threshold: float | None
    ) -> None:
        for row in rows:
            for key, value in (("threshold", threshold), ("pixel_threshold", pixel_threshold)):
                if key not in row:
                    continue
                had = row[key]
                same = (had == "" and value is None) or (
                    had != "" and value is not None and abs(float(had) - value) <= 1e-9 * max(1.0, abs(value))
                )
                if not same:
                    raise ConfigError(
                        f"{source}: was written with {key} {had or 'none'}, this run has "
                        f"{value if value is not None else 'none'}; resume with the same model and "
                        "thresholds, or run without --resume"
                    )

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append ``rows`` and make them durable (flush + fsync) before returning."""
        assert self._fh is not None, "start() first"
        try:
            self._fh.write("".join(_csv_line(r) for r in rows))
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise output_error(self.partial, exc) from exc

    def close(self) -> None:
        """Close the partial file (it stays: the run did not complete)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self, order: Sequence[str]) -> list[dict[str, str]]:
        """Write every row of the partial file in the order of the paths ``order`` to ``scores.csv``
        (atomically), remove the partial file; returns the rows."""
        self.close()
        rank = {p: i for i, p in enumerate(order)}
        rows = sorted(_read_rows(self.partial), key=lambda r: rank.get(r["path"], len(rank)))
        write_text_atomic(self.final, ",".join(PREDICT_COLUMNS) + "\n" + "".join(_csv_line(r) for r in rows))
        self.partial.unlink()
        return rows
