"""``spotdiff benchmark``: a resumable grid of pre-trained weights x downstream methods x objects.

Each *cell* (one weights entry, one downstream entry, one object) is measured once and written
atomically to ``<out>/cells/<weights>__<downstream>__<object>.json``. A cell whose file exists is
skipped, so an interrupted benchmark resumes where it stopped. After the grid, the results are
collected into ``results.csv`` / ``results.json``, ``tables.md`` (the paper's layout: one table per
downstream method and metric, pre-training methods as rows, objects and mean as columns, AU-PR
first) and ``report.html``.

Several processes may share one ``<out>`` (one per GPU, the tasks of a job array, ``--shard I/N``):
``<out>/benchmark.json`` holds the config hash they must agree on, and every cell (and pre-training
block) runs under an exclusive, heartbeat-kept claim in ``<out>/claims`` (:class:`Claims`), so each
runs once and a killed process's cell is taken over. See docs/report.md.

This module prepares the weights (pre-training blocks first), runs the grid and collects it; the
config is :mod:`spotdiff.bench.config`, the runners :mod:`spotdiff.bench.cells`, the claims
:mod:`spotdiff.bench.claims` and the outputs :mod:`spotdiff.bench.results`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotdiff import __version__
from spotdiff.bench.cells import DOWNSTREAM
from spotdiff.bench.claims import (
    CLAIM_DIR,
    LEASE_SECONDS,
    POLL_SECONDS,
    RECORD_NAME,
    Claims,
    bind_out,
    bind_shards,
    read_json_object,
    work_through,
)
from spotdiff.bench.results import headline, write_results
from spotdiff.bench.schema import BenchmarkConfig, Cell, WeightsSpec, jsonable
from spotdiff.configs import build
from spotdiff.devices import resolve_device
from spotdiff.errors import ConfigError, SpotdiffError, WeightsError
from spotdiff.files import write_json_atomic
from spotdiff.models import is_random, load_weights, random_init_warning, torchvision_weights, weights_record
from spotdiff.progress import bar
from spotdiff.report.tables import Table

log = logging.getLogger(__name__)

CELL_DIR = "cells"
WEIGHTS_DIR = "weights"
WORK_DIR = "work"


def check_weights(config: BenchmarkConfig) -> None:
    """Read every ``file`` weights entry (downloading torchvision weights not cached yet) and check it
    fits its architecture, before anything is written; warn once per entry without weights."""
    for spec in config.weights:
        if spec.pretrain is not None:
            continue
        if isinstance(spec.file, Path) and not spec.file.is_file():
            raise ConfigError(f"weights {spec.name!r}: file not found: {spec.file}")
        if spec.file is None:
            random_init_warning(
                f"weights {spec.name!r} has no file; set file: imagenet for torchvision's "
                "ImageNet weights (file: random hides this warning)"
            )
            continue
        try:
            load_weights(spec.arch, spec.file)
        except WeightsError as exc:
            raise WeightsError(f"weights {spec.name!r}: {exc}") from exc


def pretrained_file(out: Path, name: str) -> Path:
    """Where the backbone of weights entry ``name`` with a ``pretrain`` block is exported."""
    return out / WEIGHTS_DIR / f"{name}.safetensors"


def weights_files(config: BenchmarkConfig, out: Path) -> dict[str, Path | str | None]:
    """Backbone of every weights entry: None for random init; a torchvision name resolved
    (``imagenet`` -> ``ResNet18_Weights.IMAGENET1K_V1``, so cells fingerprint the weights torchvision
    gave, not the alias); its ``file``; or ``out/weights/<name>.safetensors`` for a ``pretrain`` block."""
    files: dict[str, Path | str | None] = {}
    for spec in config.weights:
        if spec.pretrain is not None:
            files[spec.name] = pretrained_file(out, spec.name)
        elif is_random(spec.file):
            files[spec.name] = None
        elif isinstance(spec.file, str):
            files[spec.name] = str(torchvision_weights(spec.arch, spec.file))
        else:
            files[spec.name] = spec.file
    return files


def prepare_weights(
    config: BenchmarkConfig, out: Path, claims: Claims, poll: float = POLL_SECONDS
) -> dict[str, Path | str | None]:
    """Backbone file of every weights entry; runs (or resumes) the ``pretrain`` blocks first.

    A backbone already exported to ``<out>/weights/<name>.safetensors`` is reused when the block
    recorded beside it (``<name>.json``) is the same; a changed block is a ConfigError. Each block
    runs under a claim, so processes sharing ``out`` pre-train it once (the others wait).
    """
    files = weights_files(config, out)
    units = []
    for spec in config.weights:
        if spec.pretrain is None:  # checked by check_weights
            continue
        dest = pretrained_file(out, spec.name)
        record = dest.with_suffix(".json")
        block = {"arch": spec.arch, "pretrain": jsonable(spec.pretrain), "seed": config.seed}

        def done(dest: Path = dest, record: Path = record, block: dict = block) -> bool:
            if not (dest.is_file() and record.is_file()):
                return False
            if read_json_object(record) != block:
                raise ConfigError(
                    f"{dest}: pre-trained with another pretrain block; use another --out "
                    f"or delete {dest.name} and {record.name} to re-train"
                )
            return True

        def run(spec: WeightsSpec = spec, dest: Path = dest, record: Path = record, block: dict = block) -> bool:
            pretrain_and_export(spec, config, out / "pretrain" / spec.name, dest)
            write_json_atomic(record, block)
            return True

        if done():
            log.info(f"weights {spec.name}: already pre-trained ({dest})")
        units.append((f"_weights-{spec.name}", done, run))
    work_through(claims, units, "pre-training block(s)", poll)
    return files


def pretrain_and_export(spec: WeightsSpec, config: BenchmarkConfig, run_dir: Path, dest: Path) -> None:
    """Run one ``pretrain`` block into ``run_dir`` and export its backbone to ``dest``."""
    from spotdiff.pretrain.config import PretrainConfig
    from spotdiff.pretrain.export import export_backbone
    from spotdiff.pretrain.train import run_pretrain

    block = dict(spec.pretrain or {})
    block.setdefault("arch", spec.arch)
    block.setdefault("seed", config.seed)
    block.setdefault("device", config.device)
    block["out"] = str(run_dir)
    block["resume"] = True
    pcfg = build(PretrainConfig, block, f"weights {spec.name!r}: pretrain")
    log.info(f"weights {spec.name}: pre-training ({pcfg.method}{' + SPD' if pcfg.spd else ''}, {pcfg.arch})")
    export_backbone(run_pretrain(pcfg), dest, arch=spec.arch)


def grid(config: BenchmarkConfig, weights_files: Mapping[str, Path | str | None]) -> list[Cell]:
    """Every cell, ordered weights, then downstream, then object."""
    return [
        Cell(w, d, obj, weights_files.get(w.name, w.file))
        for w in config.weights
        for d in config.downstream
        if d.weights is None or w.name in d.weights
        for obj in config.objects
    ]


def shard_cells(cells: Sequence[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """The cells of shard ``(I, N)``: every N-th cell of the grid, starting with cell I (1-based)."""
    if shard is None:
        return list(cells)
    index, count = shard
    return [cell for i, cell in enumerate(cells) if i % count == index - 1]


def cell_path(out: Path, cell: Cell) -> Path:
    return out / CELL_DIR / f"{cell.key}.json"


def read_cell(path: Path, cell: Cell, config: BenchmarkConfig) -> dict[str, Any] | None:
    """The stored result of ``cell``, or None when not yet measured.

    A file for another configuration (different fingerprint) or an unreadable file is an error:
    the user chooses between a fresh ``--out`` and deleting it.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        stored = data["fingerprint"]
        data["metrics"]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable cell result ({exc}); delete it to re-run the cell") from exc
    if stored != jsonable(cell.fingerprint(config)):
        raise ConfigError(
            f"{path}: measured with another configuration; use another --out or delete the file to re-run the cell"
        )
    return data


def run_cell(cell: Cell, config: BenchmarkConfig, out: Path, claims: Claims | None = None) -> dict[str, Any] | None:
    """Measure one cell and write its JSON atomically; returns the stored dict.

    With ``claims`` (this process holds the cell's claim), the result is written only if the claim
    is still this process's; otherwise it is discarded and None is returned.
    """
    runner = DOWNSTREAM.get(cell.downstream.method)
    if runner is None:
        raise ConfigError(f"no runner registered for downstream method {cell.downstream.method!r}")
    start = time.perf_counter()
    output = runner(cell, config, out / WORK_DIR / cell.key)
    data = {
        "key": cell.key,
        "weights": cell.weights.name,
        "downstream": cell.downstream.name,
        "object": cell.object,
        "metrics": jsonable(output.metrics),
        "seconds": round(time.perf_counter() - start, 3),
        "scores": None if output.scores is None else [float(s) for s in output.scores],
        "labels": None if output.labels is None else [int(v) for v in output.labels],
        "defect_types": None if output.defect_types is None else [str(t) for t in output.defect_types],
        "init_weights": weights_record(cell.weights.arch, cell.weights_file),
        "fingerprint": cell.fingerprint(config),
        "spotdiff_version": __version__,
    }
    if claims is not None and not claims.owns(cell.key):
        log.info(
            f"{cell.key}: another process took this cell over while it ran (no heartbeat seen for "
            f"{claims.lease:g} s); this result is discarded"
        )
        return None
    write_json_atomic(cell_path(out, cell), data)
    return data


@dataclass
class BenchmarkResult:
    """What a benchmark run produced: the stored cell dicts (grid order; empty when the tables were
    not written by this process), the cells it ran and found done, and how many grid cells are missing."""

    cells: list[dict[str, Any]]
    ran: list[str]
    skipped: list[str]
    tables: list[Table]
    out: Path
    missing: int = 0


def run_benchmark(
    config: BenchmarkConfig,
    out: str | os.PathLike[str],
    shard: tuple[int, int] | None = None,
    lease: float = LEASE_SECONDS,
) -> BenchmarkResult:
    """Run (or resume) the grid, or shard ``(I, N)`` of it, then write the tables when the grid is complete.

    Several processes may share ``out`` (one per GPU, the tasks of a cluster job array): each cell
    runs under a claim (:class:`Claims`), so it runs once, and a killed process's cell is taken over.
    Without ``shard`` a process runs any cell not yet claimed and waits for the cells other
    processes hold; with ``shard`` it runs only the cells of its shard. The tables (results.csv/json,
    tables.md, report.html) are written by a process that sees every cell of the grid done at its end.
    """
    out = Path(out)
    claims = Claims(out / CLAIM_DIR, lease)
    poll = min(POLL_SECONDS, claims.heartbeat)
    resolve_device(config.device)  # the one device rule: refuses a GPU this machine does not have
    check_weights(config)
    out.mkdir(parents=True, exist_ok=True)
    bind_out(config, out)
    if shard is not None:
        bind_shards(out, shard)
    try:
        if shard is not None:
            holder = claims.claim(f"_shard-{shard[0]}-of-{shard[1]}")
            if holder is not None:
                raise ConfigError(
                    f"--shard {shard[0]}/{shard[1]} is already being run by {holder} "
                    f"(claim in {out / CLAIM_DIR}); give each process its own shard"
                )
        cells = grid(config, prepare_weights(config, out, claims, poll))
        mine = shard_cells(cells, shard)
        done_before = [c.key for c in mine if read_cell(cell_path(out, c), c, config) is not None]
        if done_before:
            log.info(f"skipped {len(done_before)} cell(s) already measured in {out / CELL_DIR}")
        progress_bar = bar(total=len(mine), initial=len(done_before), desc="benchmark", unit="cell")
        try:

            def unit(cell: Cell) -> tuple[str, Callable[[], bool], Callable[[], bool]]:
                def run() -> bool:
                    progress_bar.set_postfix_str(cell.key)
                    try:
                        data = run_cell(cell, config, out, claims)
                    except SpotdiffError as exc:
                        raise type(exc)(f"cell {cell.key}: {exc}") from exc
                    if data is None:
                        return False
                    log.info(f"{cell.key}: {headline(data['metrics'])} ({data['seconds']:.1f} s)")
                    progress_bar.update(1)
                    return True

                return cell.key, cell_path(out, cell).is_file, run

            ran = work_through(claims, [unit(c) for c in mine], "cell(s)", poll)
        finally:
            progress_bar.close()
        skipped = [c.key for c in mine if c.key not in ran]
        missing = sum(not cell_path(out, c).is_file() for c in cells)
        if missing:
            log.info(
                f"{missing} cell(s) of other shards are not done yet; the process that finishes the last "
                "one writes the tables (or run `spotdiff benchmark --collect` when all are done)"
            )
            return BenchmarkResult([], ran, skipped, [], out, missing)
        holder = claims.claim("_tables")
        if holder is not None:
            log.info(f"every cell is done; the tables are being written by {holder}")
            return BenchmarkResult([], ran, skipped, [], out, 0)
        done = []
        for c in cells:
            data = read_cell(cell_path(out, c), c, config)
            if data is None:  # every cell was measured above (missing == 0)
                raise ConfigError(f"{cell_path(out, c)}: the result vanished while the tables were being written")
            done.append(data)
        tables = write_results(config, done, out)
        return BenchmarkResult(done, ran, skipped, tables, out, 0)
    finally:
        claims.close()


def collect_benchmark(config: BenchmarkConfig, out: str | os.PathLike[str]) -> BenchmarkResult:
    """Write the tables of ``out`` from the cells measured so far (runs nothing); ``missing`` counts the rest."""
    out = Path(out)
    if not (out / RECORD_NAME).is_file():
        raise ConfigError(f"{out}: no benchmark here ({RECORD_NAME} not found)")
    bind_out(config, out)
    cells = grid(config, weights_files(config, out))
    done = [d for d in (read_cell(cell_path(out, c), c, config) for c in cells) if d is not None]
    if not done:
        raise ConfigError(f"{out}: no cell is done yet; nothing to collect")
    tables = write_results(config, done, out)
    return BenchmarkResult(done, [], [d["key"] for d in done], tables, out, len(cells) - len(done))
