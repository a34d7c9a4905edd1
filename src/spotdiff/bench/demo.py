"""``spotdiff demo``: the whole pipeline on the synthetic dataset, on a CPU, in minutes.

Steps (each logged; heavy loops show progress bars):

1. synthesize the default dataset (:func:`spotdiff.data.synth.generate`) into ``<out>/data``;
2. pre-train a small ResNet-18 on the objects' normal *training* images (1cls split; test images are
   never seen) twice, same seed and budget: SimSiam, and SimSiam + SPD;
3. export both backbones to torchvision-compatible ``<out>/weights/*.safetensors``;
4. fit PaDiM on every object with three backbones (random init, SimSiam, SimSiam + SPD), plus
   the backbone given by ``weights`` (e.g. ``"imagenet"``, read from torchvision's cache) if any, and
   evaluate it on the object's test split;
5. write ``results.json``, ``results.csv``, ``tables.md`` and the self-contained ``report.html``.

Every figure is whatever the run measures. A few minutes of CPU pre-training on a few hundred
synthetic images is not the paper's 200 ImageNet epochs: the demo shows the pipeline working end to
end, not the paper's numbers, and random init may well come out ahead.

Rerunning with the same settings reuses the synthesized data and the exported backbones; other
settings start the work folder afresh (only folders the demo wrote are removed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spotdiff.errors import ConfigError, DataError
from spotdiff.files import write_json_atomic, write_text_atomic
from spotdiff.models import LoadedWeights, WeightsLike, describe_weights, is_random, load_weights
from spotdiff.report.html import report_sections, write_html_report
from spotdiff.report.plots import Predictions
from spotdiff.report.tables import (
    ResultRecord,
    Table,
    object_backbone_table,
    paper_tables,
    records_csv,
    tables_markdown,
)

log = logging.getLogger(__name__)

MARKER = "demo.json"
OWNED = ("data", "pretrain", "pretrain-images", "weights")  # folders the demo may remove
RANDOM, SIMSIAM, SIMSIAM_SPD = "random init", "SimSiam", "SimSiam+SPD"
BACKBONES = (RANDOM, SIMSIAM, SIMSIAM_SPD)
PRETRAINED = {SIMSIAM: ("simsiam", False), SIMSIAM_SPD: ("simsiam_spd", True)}  # label -> (file stem, spd)


@dataclass(frozen=True)
class DemoSettings:
    """Scale of the demo.

    Attributes:
        scale: size factor of the synthetic dataset (:func:`spotdiff.data.synth.generate`).
        data_size: side of the synthesized images, pixels.
        image_size: side of the images for PaDiM (training and test), pixels.
        pretrain_size: side of the pre-training views, pixels.
        pretrain_steps / pretrain_batch: optimizer steps and images per step of each pre-training.
        pretrain_lr: pre-training lr per 256 images: 0.05, SimSiam's recipe (Chen & He 2021). (An earlier
            0.5 had been chosen by looking at test results.) At this lr a few
            dozen steps move the weights little: the demo shows the pipeline, not SPD's effect.
        blend_aspect: SmoothBlend's aspect range for the SPD arm: 0.5-2 (ours), with which the blend
            keeps its stated area and smoothness from 65 px (the library's 0.3-3.3 needs 91 px).
        padim_batch: images per PaDiM feature batch.
        arch / layers: backbone and the PaDiM feature stages.
        seed: seeds data synthesis, both pre-trainings, the random init and PaDiM's channel draw.
        gallery_size: test images per gallery figure.
        quick: the ``--quick`` smoke run: its numbers are labelled as such (:func:`smoke_note`).
    """

    scale: float = 1.0
    data_size: int = 128
    image_size: int = 96
    pretrain_size: int = 72
    pretrain_steps: int = 60
    pretrain_batch: int = 32
    pretrain_lr: float = 0.05
    blend_aspect: tuple[float, float] = (0.5, 2.0)
    padim_batch: int = 32
    arch: str = "resnet18"
    layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    seed: int = 0
    gallery_size: int = 8
    quick: bool = False

    @classmethod
    def preset(cls, quick: bool = False, seed: int = 0) -> DemoSettings:
        """The default demo (minutes on a 2-core CPU) or the ``--quick`` smoke run (< 2 minutes)."""
        if quick:
            return cls(
                scale=0.2,
                data_size=64,
                image_size=64,
                pretrain_size=72,
                pretrain_steps=4,
                pretrain_batch=8,
                padim_batch=16,
                seed=seed,
                gallery_size=4,
                quick=True,
            )
        return cls(seed=seed)


@dataclass
class DemoResult:
    """Outputs of a demo run: the headline table, all records and output paths."""

    table: Table
    records: list[ResultRecord]
    report: Path
    out: Path
    seconds: float
    smoke_note: str = ""  # set for the --quick smoke run (:func:`smoke_note`)


def _prepare_out(out: Path, settings: DemoSettings) -> None:
    """Create ``out``; drop an earlier demo's work when its settings differ; never touch foreign folders."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    marker = out / MARKER
    wanted = json.loads(json.dumps(asdict(settings)))
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous != wanted:
            log.info(f"demo: {out} holds a run with other settings; starting afresh")
            for name in OWNED:
                shutil.rmtree(out / name, ignore_errors=True)
    elif out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out}: folder exists and is not a spotdiff demo folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, wanted)


def synthesize(out: Path, settings: DemoSettings) -> Path:
    """Step 1: the synthetic dataset in the raw VisA layout; returns its root."""
    from spotdiff.data.synth import generate

    return Path(generate(out / "data", seed=settings.seed, scale=settings.scale, image_size=settings.data_size))


def objects_of(data_root: Path) -> list[str]:
    """Object names of a raw-VisA-layout root, in the order of its 1cls split CSV."""
    import csv

    split = data_root / "split_csv" / "1cls.csv"
    try:
        with open(split, newline="", encoding="utf-8") as fh:
            return list(dict.fromkeys(row["object"] for row in csv.DictReader(fh)))
    except (OSError, KeyError) as exc:
        raise DataError(f"{split}: cannot read the object list ({exc})") from exc


def pretrain_images(data_root: Path, objects: list[str], dest: Path, image_size: int) -> Path:
    """A folder ``dest/<object>/`` of the normal training images (1cls ``train``), hard-linked (or
    copied) from the dataset, for pre-training; test images are left out."""
    from spotdiff.data import open_dataset

    for obj in objects:
        folder = dest / obj
        folder.mkdir(parents=True, exist_ok=True)
        for path in open_dataset(data_root, obj, split="1cls", subset="train", image_size=image_size).paths:
            src = Path(path)
            target = folder / src.name
            if not target.exists():
                try:
                    os.link(src, target)
                except OSError:
                    shutil.copyfile(src, target)
    return dest


def pretrain_backbone(images: Path, out: Path, settings: DemoSettings, spd: bool, stem: str) -> Path:
    """Steps 2-3: pre-train SimSiam (+ SPD when ``spd``) and export the backbone; returns the
    ``.safetensors`` file (reused when already exported)."""
    weights = out / "weights" / f"{stem}.safetensors"
    if weights.is_file():
        log.info(f"demo: reusing {weights}")
        return weights
    from spotdiff.pretrain.config import PretrainConfig
    from spotdiff.pretrain.export import export_backbone
    from spotdiff.pretrain.train import run_pretrain

    run_dir = out / "pretrain" / stem
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted earlier attempt
    config = PretrainConfig(
        method="simsiam",
        spd=spd,
        arch=settings.arch,
        data=str(images),
        out=str(run_dir),
        steps=settings.pretrain_steps,
        batch_size=settings.pretrain_batch,
        lr=settings.pretrain_lr,
        image_size=settings.pretrain_size,
        workers=0,
        amp="none",
        device="cpu",
        channels_last=False,
        seed=settings.seed,
        checkpoint_every=0,
        log_every=max(1, settings.pretrain_steps // 10),
        resume=False,
        hparams={"blend_aspect": list(settings.blend_aspect)} if spd else {},
    )
    checkpoint = run_pretrain(config)
    export_backbone(checkpoint, weights, arch=settings.arch)
    return weights


def evaluate_object(
    data_root: Path, obj: str, label: str, weights: WeightsLike, settings: DemoSettings
) -> tuple[dict[str, Any], Predictions]:
    """Step 4 for one (object, backbone): fit PaDiM on normal training images, evaluate on the test set."""
    from spotdiff.data import open_dataset
    from spotdiff.detect import PaDiM
    from spotdiff.detect.colour import normal_statistics, scale_from_normals
    from spotdiff.detect.evaluate import evaluate_detector

    train = open_dataset(data_root, obj, split="1cls", subset="train", image_size=settings.image_size)
    test = open_dataset(data_root, obj, split="1cls", subset="test", image_size=settings.image_size)
    detector = PaDiM(
        arch=settings.arch, weights=weights, layers=settings.layers, seed=settings.seed, batch_size=settings.padim_batch
    ).fit(train)
    metrics, per_image, maps, masks = evaluate_detector(detector, test, settings.padim_batch)
    labels = np.array([r["label"] for r in per_image])
    normals = normal_statistics(np.array([r["score"] for r in per_image])[labels == 0], maps[labels == 0])
    scale = scale_from_normals(normals, "test-set normal images")
    predictions = Predictions(
        obj,
        label,
        np.array([r["score"] for r in per_image]),
        np.array([r["label"] for r in per_image]),
        [r["defect_type"] for r in per_image],
        maps,
        masks,
        paths=[r["path"] for r in per_image],
        map_range=(scale.vmin, scale.vmax),
        threshold=float(normals["score_max"]),
    )
    return metrics, predictions


INTRO = """This report was produced by the command "spotdiff demo" on the synthetic dataset that ships with spotdiff \
(rendered images of three object types with painted defects, in the VisA layout). A ResNet-18 was \
pre-trained on the normal training images with SimSiam, and with SimSiam + SPD (same seed, same \
number of steps), then PaDiM was fitted on every object with three backbones: random init, SimSiam \
and SimSiam + SPD.

Settings: {settings}. Run time (wall): {timing}.

What this shows: the whole pipeline (data, pre-training, export, 1-class detection, exact metrics, \
report) running end to end, and how the three backbones compare on this run. What it does not show: \
the paper's results, nor whether SPD helps: A few minutes of CPU pre-training on a few hundred small \
synthetic images is not 200 ImageNet epochs; random init may win here, and a difference between the \
SimSiam and SimSiam + SPD rows here also reflects SPD's extra BatchNorm passes, not only its loss. \
The controlled test of SPD (an eta = 0 control, BN re-estimated, pre-registered) is \
benchmarks/spd_effect.py; see benchmarks/results_spd.md for what it found. The pre-training lr is \
SimSiam's recipe (0.05 per 256 images), not one chosen on test results. Every number is measured by \
this run."""


def smoke_note(settings: DemoSettings, records: list[ResultRecord]) -> str:
    """For the ``--quick`` run: one paragraph saying its figures are a smoke test, with the test-set
    size they come from; "" for the full demo."""
    if not settings.quick:
        return ""
    sets = [r.metrics["test_set"] for r in records if isinstance(r.metrics.get("test_set"), dict)]
    size = ""
    if sets:
        normal, anomalous = min(int(t["normal"]) for t in sets), min(int(t["anomalous"]) for t in sets)
        size = f" as few as {normal} normal and {anomalous} anomalous test images per object,"
    return (
        "SMOKE TEST (demo --quick): these numbers only show that every stage ran. They come from"
        f"{size} tiny images and a few pre-training steps, so AU-ROC below 50 or AU-PR below "
        "chance is expected and means nothing; run `spotdiff demo` (without --quick) for figures "
        "worth reading."
    )


def run_demo(
    settings: DemoSettings, out: str | os.PathLike[str] = "spotdiff-demo", weights: WeightsLike = None
) -> DemoResult:
    """Run the whole demo into ``out``; returns the headline table and paths (see module docstring).

    ``weights``: an extra backbone for PaDiM (anything :func:`spotdiff.models.load_weights` takes,
    e.g. ``"imagenet"``), read before anything is written; None or ``"random"``: none.
    """
    if settings.arch != "resnet18":
        raise ConfigError("the demo runs on resnet18 only")
    extra = None if is_random(weights) else load_weights(settings.arch, weights)
    backbones = BACKBONES if extra is None else (*BACKBONES, describe_weights(extra.record(), short=True))
    start = time.perf_counter()
    out = Path(out)
    _prepare_out(out, settings)
    stages: dict[str, float] = {}  # wall seconds per stage

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        stages[stage] = round(stages.get(stage, 0.0) + now - since, 1)
        return now

    t = start
    log.info("demo [1/5] synthesizing the dataset")
    data_root = synthesize(out, settings)
    objects = objects_of(data_root)
    log.info(f"demo: objects {', '.join(objects)}")
    log.info("demo [2/5] collecting the normal training images for pre-training")
    images = pretrain_images(data_root, objects, out / "pretrain-images", settings.data_size)
    t = lap("data", t)

    used: dict[str, Path | LoadedWeights | None] = {RANDOM: None}
    if extra is not None:
        used[backbones[-1]] = extra
    for i, (label, (stem, spd)) in enumerate(PRETRAINED.items(), start=1):
        log.info(
            f"demo [3/5] pre-training {label} ({i}/{len(PRETRAINED)}): {settings.pretrain_steps} steps "
            f"of {settings.pretrain_batch} images at {settings.pretrain_size} px"
        )
        reused = (out / "weights" / f"{stem}.safetensors").is_file()
        used[label] = pretrain_backbone(images, out, settings, spd, stem)
        t = lap(f"pretrain {label}" + (" (reused)" if reused else ""), t)

    records: list[ResultRecord] = []
    predictions: list[Predictions] = []
    n = len(objects) * len(backbones)
    for k, (obj, label) in enumerate(((o, b) for o in objects for b in backbones), start=1):
        log.info(f"demo [4/5] PaDiM {k}/{n}: {obj}, {label} backbone")
        metrics, preds = evaluate_object(data_root, obj, label, used[label], settings)
        records.append(ResultRecord(obj, label, "padim", metrics))
        predictions.append(preds)
    t = lap("PaDiM fit + test", t)

    log.info("demo [5/5] writing the report")
    table = object_backbone_table(records, backbones=backbones, title="PaDiM on the synthetic dataset (%)")
    tables = [table, *paper_tables(records, methods=backbones, title_prefix="PaDiM: ")]
    settings_text = (
        f"{settings.arch}; pre-training: {settings.pretrain_steps} steps of {settings.pretrain_batch} "
        f"images at {settings.pretrain_size} px, lr {settings.pretrain_lr:g} per 256 images; "
        f"PaDiM at {settings.image_size} px "
        f"(layers {', '.join(settings.layers)}); synthetic data: scale {settings.scale}, "
        f"{settings.data_size} px; seed {settings.seed}"
    )
    if extra is not None:
        settings_text += f"; extra backbone {backbones[-1]}: {describe_weights(extra.record())}"
    timing = ", ".join(f"{name} {sec:.0f} s" for name, sec in stages.items())
    report = out / "report.html"
    smoke = smoke_note(settings, records)
    intro = INTRO.format(settings=settings_text, timing=timing)
    write_html_report(
        report,
        "spotdiff demo",
        report_sections(tables, predictions, settings.gallery_size),
        intro=f"{smoke}\n\n{intro}" if smoke else intro,
    )
    lap("report", t)
    seconds = round(time.perf_counter() - start, 1)
    write_json_atomic(
        out / "results.json",
        {
            "settings": asdict(settings),
            "seconds": seconds,
            "extra_weights": None if extra is None else extra.record(),
            "stage_seconds": stages,
            "records": [r.to_dict() for r in records],
        },
    )
    write_text_atomic(out / "results.csv", records_csv(records))
    write_text_atomic(
        out / "tables.md",
        "# spotdiff demo\n\n"
        + (f"**{smoke}**\n\n" if smoke else "")
        + "Values are percentages with one decimal.\n\n"
        + tables_markdown(tables),
    )
    log.info(
        f"demo: done in {seconds:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in stages.items())}); report: {report}"
    )
    return DemoResult(table, records, report, out, seconds, smoke)
