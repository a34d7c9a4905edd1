"""The benchmark's downstream runners: one cell (weights x downstream method x object) measured.

Downstream methods are looked up in :data:`DOWNSTREAM` (name -> runner); a runner takes the
:class:`Cell`, the :class:`BenchmarkConfig` and a scratch folder and returns a :class:`CellOutput`.
Tests register fast fake runners there to check the grid logic.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spotdiff.bench.schema import BenchmarkConfig, Cell, CellOutput, Runner
from spotdiff.configs import build
from spotdiff.devices import resolve_device
from spotdiff.errors import ConfigError


def _run_detector_cell(kind: str, cell: Cell, config: BenchmarkConfig) -> CellOutput:
    """Fit detector ``kind`` (params go to its constructor, except ``split``) and evaluate it."""
    from spotdiff.data import open_dataset
    from spotdiff.detect import DETECTORS
    from spotdiff.detect.evaluate import evaluate_detector

    params = dict(cell.downstream.params)
    split = params.pop("split", "1cls")
    try:
        detector = DETECTORS[kind](
            arch=cell.weights.arch,
            weights=cell.weights_file,
            seed=config.seed,
            batch_size=config.batch_size,
            device=str(resolve_device(config.device)),  # detectors take a torch device name, not auto
            **params,
        )
    except TypeError as exc:
        raise ConfigError(f"downstream {cell.downstream.name!r}: bad params {params} ({exc})") from exc
    train = open_dataset(config.data_root, cell.object, split=split, subset="train", image_size=config.image_size)
    test = open_dataset(config.data_root, cell.object, split=split, subset="test", image_size=config.image_size)
    detector.fit(train)
    metrics, per_image, _, _ = evaluate_detector(detector, test, config.batch_size)
    return CellOutput(
        metrics, [r["score"] for r in per_image], [r["label"] for r in per_image], [r["defect_type"] for r in per_image]
    )


def run_padim_cell(cell: Cell, config: BenchmarkConfig, work_dir: Path) -> CellOutput:
    """PaDiM fitted on the object's normal training images (split ``params.split``, default 1cls)."""
    return _run_detector_cell("padim", cell, config)


def run_patchcore_cell(cell: Cell, config: BenchmarkConfig, work_dir: Path) -> CellOutput:
    """PatchCore fitted on the object's normal training images (split ``params.split``, default 1cls)."""
    return _run_detector_cell("patchcore", cell, config)


def _run_finetune_cell(task: str, cell: Cell, config: BenchmarkConfig, work_dir: Path) -> CellOutput:
    """Fine-tune under ``params.protocol`` on every seed (``params.seeds``, default 5); the cell's
    metrics are the means over seeds, with ``<metric>_std`` the sample std."""
    from spotdiff.finetune import FinetuneConfig, run_finetune

    params = dict(cell.downstream.params)
    fixed = {
        "task": task,
        "data": config.data_root,
        "out": work_dir,
        "object": cell.object,
        "weights": cell.weights_file,
        "arch": cell.weights.arch,
        "image_size": config.image_size,
        "device": config.device,
    }
    if taken := sorted(set(params) & set(fixed)):
        raise ConfigError(f"downstream {cell.downstream.name!r}: params may not set {taken} (the grid sets them)")
    ft = build(FinetuneConfig, {**fixed, **params}, f"downstream {cell.downstream.name!r}: params")
    summary = run_finetune(ft)["aggregate"][cell.object]
    metrics: dict[str, Any] = {}
    for name, stat in summary.items():
        if isinstance(stat, Mapping) and "mean" in stat:
            metrics[name] = stat["mean"]
            metrics[f"{name}_std"] = stat["std"]
    return CellOutput(metrics)


def run_cls_cell(cell: Cell, config: BenchmarkConfig, work_dir: Path) -> CellOutput:
    """2-class classification fine-tuning under ``params.protocol`` (highshot, 5shot, 10shot)."""
    return _run_finetune_cell("cls", cell, config, work_dir)


def run_seg_cell(cell: Cell, config: BenchmarkConfig, work_dir: Path) -> CellOutput:
    """2-class segmentation (U-Net) fine-tuning under ``params.protocol`` (highshot, 5shot, 10shot)."""
    return _run_finetune_cell("seg", cell, config, work_dir)


#: Downstream method name -> runner. Register more (or fakes, in tests) by adding entries.
DOWNSTREAM: dict[str, Runner] = {
    "padim": run_padim_cell,
    "patchcore": run_patchcore_cell,
    "cls": run_cls_cell,
    "seg": run_seg_cell,
}
