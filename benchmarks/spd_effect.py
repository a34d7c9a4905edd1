"""Does SPD help? The pre-registered, controlled experiment of issue 22 (see ``benchmarks/spd_prereg.md``).

Per seed s (split seed = model seed, magnetic-tile images): four arms, every one read by the
detectors only after its BatchNorm statistics were re-estimated on the training normals
(``spotdiff.models.bn``; the raw statistics' figures are kept too):

* ``spd_eta0.1``  SimSiam + SPD, eta = 0.1;
* ``spd_eta0``    the control: the complete SPD path (same views, passes, BN exposure), eta = 0;
* ``simsiam``     plain SimSiam (reference);
* ``start``       the untrained start every pre-trained arm of the seed begins from (reference).

Endpoints (fixed in the pre-registration): primary, the per-seed paired difference in PaDiM pixel
AU-PR, spd_eta0.1 - spd_eta0 (mean, 95 % t-interval, exact Wilcoxon signed-rank p); secondary, image
AU-PR, AU-PRO, PatchCore, 2-class 10-shot segmentation AU-PR (U-Net fine-tuned from the backbone);
a manipulation check (mean cos(weak, blended) against cos(weak, weak') in the backbone's pooled
features, on held-out normals).

Usage (repository root)::

    PYTHONPATH=src python benchmarks/spd_effect.py --design cpu  --work /tmp/spd22   # 2 cores
    PYTHONPATH=src python benchmarks/spd_effect.py --design cuda --work /tmp/spd22g  # one GPU
    PYTHONPATH=src python benchmarks/spd_effect.py --tiny --work /tmp/spd22t         # CI-sized
    PYTHONPATH=src python benchmarks/spd_effect.py --design cpu --work W --cell spd_eta0:3  # one cell again

The script refuses to run (one line, exit 2) unless ``spd_prereg.md`` is committed and unchanged
since its commit, whose hash goes into every result row. Each finished cell (seed, arm) is
appended to ``WORK/results.jsonl`` at once with the code's commit, the command and the seed; a
rerun with the same ``--work`` skips finished cells (resume). ``WORK/analysis.md`` is rewritten
after every cell from the finished ones (labelled ``partial: N of M seeds`` until all are done).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from spotdiff.errors import ConfigError, SpotdiffError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "realdata" / "magnetic_tile"
PREREG = Path(__file__).resolve().with_name("spd_prereg.md")
ARMS = ("spd_eta0.1", "spd_eta0", "simsiam", "start")
ARM_SETTINGS = {"spd_eta0.1": (True, 0.1), "spd_eta0": (True, 0.0), "simsiam": (False, 0.1)}
PRIMARY = ("spd_eta0.1", "spd_eta0")
DET_METRICS = ("pixel_aupr", "image_aupr", "pixel_aupro", "image_auroc")
BLEND_ASPECT = (0.5, 2.0)  # ours: with it SmoothBlend holds its stated area and smoothness from 65 px (prereg)


@dataclass(frozen=True)
class Design:
    """Everything that sets one cell's numbers (and its cost)."""

    seeds: int
    steps: int  # pre-training optimizer steps
    batch: int  # pre-training images per step
    pretrain_size: int  # pre-training view side, px
    image_size: int  # detector / BN / segmentation / manipulation-check image side, px
    seg_steps: int  # U-Net fine-tuning steps (10-shot)
    seg_batch: int
    seg_shots: int  # defect images (and as many training normals) for the 2-class protocol
    arch: str = "resnet18"
    device: str = "cpu"
    amp: str = "none"
    max_train: int | None = None  # None: every training normal (tiny: a few)
    max_test_per_class: int | None = None  # None: the whole test set
    # tiny only (CI speed); left out of the results' design record when at these defaults:
    blend_area: tuple[float, float] = (0.005, 0.01)  # SmoothBlend's (the library's default)
    proj_dim: int = 2048  # SimSiam's projector / predictor widths (the recipe)
    pred_dim: int = 512
    workers: int = 0  # pre-training data-loading processes (views do not depend on it; not recorded)


CI_ONLY_DEFAULTS = {"blend_area": [0.005, 0.01], "proj_dim": 2048, "pred_dim": 512}


def design_record(design: Design) -> dict[str, Any]:
    """The design as stored in every result row (JSON types; CI-only fields only when changed)."""
    tag = json.loads(json.dumps(asdict(design)))
    return {k: v for k, v in tag.items() if k != "workers" and not (k in CI_ONLY_DEFAULTS and CI_ONLY_DEFAULTS[k] == v)}


DESIGNS = {
    # CI: every arm, every endpoint and the statistics, a few images (tests/test_spd_effect.py)
    "tiny": Design(
        seeds=2,
        steps=1,
        batch=4,
        pretrain_size=32,
        image_size=32,
        seg_steps=1,
        seg_batch=4,
        seg_shots=2,
        max_train=8,
        max_test_per_class=4,
        blend_area=(0.04, 0.08),
        proj_dim=32,
        pred_dim=16,
    ),
    # 2 idle CPU cores, ~60-75 min for the whole design (sizing in spd_prereg.md)
    "cpu": Design(
        seeds=8, steps=30, batch=32, pretrain_size=72, image_size=64, seg_steps=60, seg_batch=8, seg_shots=10
    ),
    # one H200-class GPU, <= 8 min (not run yet)
    "cuda": Design(
        seeds=10,
        steps=600,
        batch=256,
        pretrain_size=72,
        image_size=64,
        seg_steps=300,
        seg_batch=16,
        seg_shots=10,
        device="cuda",
        amp="bf16",
        workers=12,
    ),
}


# ----------------------------------------------------------------------------- provenance
def _git(*args: str, cwd: Path = REPO) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.stdout.decode(errors="replace").strip()


def prereg_commit(path: Path) -> str:
    """The commit of the pre-registration ``path``; ConfigError if it is missing, uncommitted or changed."""
    if not path.is_file():
        raise ConfigError(f"{path}: pre-registration file missing; commit it before running")
    folder = path.parent
    commit = _git("log", "-1", "--format=%H", "--", path.name, cwd=folder)
    if not commit:
        raise ConfigError(f"{path}: pre-registration is not committed; commit it before running")
    prefix = _git("rev-parse", "--show-prefix", cwd=folder)
    try:
        committed = subprocess.run(
            ["git", "show", f"{commit}:{prefix}{path.name}"], cwd=folder, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ConfigError(f"{path}: cannot read the pre-registration at commit {commit[:12]}") from exc
    if committed != path.read_bytes():
        raise ConfigError(
            f"{path}: pre-registration changed since its commit {commit[:12]}; "
            "the experiment runs only against the committed text"
        )
    return commit


def code_commit() -> str:
    """HEAD of the repository, ``+dirty`` when tracked source files differ from it."""
    head = _git("rev-parse", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks/spd_effect.py")
    return head + ("+dirty" if dirty else "")


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children, seconds."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ----------------------------------------------------------------------------- data
@dataclass
class SeedData:
    train: list[dict[str, Any]]  # training normals (detector fit, BN re-estimation, pre-training)
    test: list[dict[str, Any]]  # held-out normals + defect images with masks
    images: Path  # PNG copies of the training normals at the pre-training size


def seed_data(root: Path, seed: int, design: Design, work: Path) -> SeedData:
    """The seed's split (split seed = model seed), decoded once and cached in ``work``."""
    from spotdiff.data import open_magnetic_tile

    size = design.image_size
    cache = work / "data" / f"split{seed}_{size}px_{design.max_train}_{design.max_test_per_class}.pt"
    folder = work / "data" / f"split{seed}_train_{design.pretrain_size}px_{design.max_train}"
    if cache.is_file() and folder.is_dir():
        saved = torch.load(cache, weights_only=True)
        return SeedData(saved["train"], saved["test"], folder)
    train_ds = open_magnetic_tile(root, "train", image_size=size, seed=seed)
    test_ds = open_magnetic_tile(root, "test", image_size=size, seed=seed)
    train_idx = list(range(len(train_ds)))[: design.max_train]
    test_idx = list(range(len(test_ds)))
    if design.max_test_per_class is not None:
        normal = [i for i in test_idx if test_ds.labels[i] == 0][: design.max_test_per_class]
        bad = [i for i in test_idx if test_ds.labels[i] == 1][: design.max_test_per_class]
        test_idx = normal + bad
    train = [train_ds[i] for i in train_idx]
    test = [test_ds[i] for i in test_idx]
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(train_idx):
        with Image.open(train_ds.paths[i]) as img:
            img.convert("RGB").resize((design.pretrain_size,) * 2, Image.BILINEAR).save(tmp / f"{k:04d}.png")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    torch.save({"train": train, "test": test}, cache)
    return SeedData(train, test, folder)


# ----------------------------------------------------------------------------- one arm's backbone
def start_backbone(seed: int, design: Design, out: Path) -> Path:
    """The exact backbone every SimSiam pre-training with ``seed`` starts from."""
    from spotdiff.pretrain.export import write_backbone
    from spotdiff.pretrain.methods import build_method

    torch.manual_seed(seed)
    method = build_method("simsiam", arch=design.arch)
    return write_backbone(method.backbone.state_dict(), design.arch, out, {"seed": seed, "method": "start"})


def pretrain_backbone(arm: str, seed: int, design: Design, images: Path, run_dir: Path) -> Path:
    """Pre-train ``arm`` with spotdiff's loop (SimSiam's recipe otherwise); return its backbone file."""
    import shutil

    from spotdiff.pretrain.config import load_config
    from spotdiff.pretrain.train import BACKBONE_NAME, run_pretrain

    if run_dir.exists():  # an interrupted cell starts again
        shutil.rmtree(run_dir)
    spd, eta = ARM_SETTINGS[arm]
    cfg = load_config(
        None,
        dict(
            method="simsiam",
            spd=spd,
            eta=eta,
            arch=design.arch,
            data=str(images),
            out=str(run_dir),
            steps=design.steps,
            batch_size=design.batch,
            image_size=design.pretrain_size,
            workers=design.workers,
            device=design.device,
            amp=design.amp,
            seed=seed,
            checkpoint_every=0,
            log_every=max(1, design.steps // 10),
            tensorboard=False,
            hparams={
                "blend_aspect": list(BLEND_ASPECT),
                **{
                    k: getattr(design, k)
                    for k in ("blend_area", "proj_dim", "pred_dim")
                    if json.loads(json.dumps(getattr(design, k))) != CI_ONLY_DEFAULTS[k]
                },
            },
        ),
    )
    run_pretrain(cfg)
    return run_dir / BACKBONE_NAME


def bn_reestimated(raw: Path, train: list[dict[str, Any]], design: Design, out: Path) -> Path:
    """``raw`` with every BN layer's running statistics re-estimated on ``train`` (eval preprocessing)."""
    from safetensors import safe_open

    from spotdiff.data.transforms import normalize
    from spotdiff.models import build_backbone
    from spotdiff.models.bn import BN_BATCH, recalibrate_batchnorm
    from spotdiff.pretrain.export import write_backbone

    net = build_backbone(design.arch, weights=str(raw)).to(design.device)
    images = torch.stack([item["image"] for item in train])
    count = recalibrate_batchnorm(net, (normalize(images[i : i + BN_BATCH]) for i in range(0, len(images), BN_BATCH)))
    with safe_open(str(raw), "pt") as fh:
        meta = {k: v for k, v in (fh.metadata() or {}).items() if k not in ("format", "arch")}
    meta.update(
        {
            "bn_recalibrated": "true",
            "bn_images": count,
            "bn_image_size": design.image_size,
            "bn_folder": "training normals of the seed's split",
        }
    )
    return write_backbone(net.state_dict(), design.arch, out, meta)


# ----------------------------------------------------------------------------- endpoints
def detector_metrics(kind: str, weights: Path, design: Design, seed: int, data: SeedData) -> dict[str, float]:
    """Fit PaDiM or PatchCore (library defaults, ``design.arch``) and score the test set."""
    from spotdiff.detect import PaDiM, PatchCore
    from spotdiff.detect.evaluate import evaluate_detector

    cls = {"padim": PaDiM, "patchcore": PatchCore}[kind]
    model = cls(arch=design.arch, weights=str(weights), seed=seed, device=design.device, num_workers=0)
    model.fit(data.train)
    metrics, _, _, _ = evaluate_detector(model, data.test, num_workers=0)
    return {k: float(metrics[k]) for k in DET_METRICS}


def segmentation_metrics(weights: Path, design: Design, seed: int, data: SeedData) -> dict[str, float]:
    """2-class k-shot segmentation: a U-Net fine-tuned from ``weights`` (the finetune package's recipe)."""
    from spotdiff.finetune.train import TensorData, build_model, evaluate_model, train_model
    from spotdiff.models import load_weights

    def tensors(items: list[dict[str, Any]]) -> TensorData:
        return TensorData(
            images=torch.stack([(it["image"] * 255).round().clamp(0, 255).to(torch.uint8) for it in items]),
            masks=torch.stack([(it["mask"].reshape(it["image"].shape[-2:]) > 0.5).to(torch.uint8) for it in items]),
            labels=torch.tensor([int(it["label"]) for it in items]),
            defect_types=[it["defect_type"] for it in items],
            paths=[it["path"] for it in items],
        )

    g = torch.Generator().manual_seed(seed)
    bad = [i for i, it in enumerate(data.test) if int(it["label"]) == 1]
    shots = sorted(bad[j] for j in torch.randperm(len(bad), generator=g)[: design.seg_shots].tolist())
    normals = torch.randperm(len(data.train), generator=g)[: design.seg_shots].tolist()
    train = tensors([data.train[i] for i in normals] + [data.test[i] for i in shots])
    test = tensors([it for i, it in enumerate(data.test) if i not in set(shots)])
    torch.manual_seed(seed)
    model = build_model("seg", design.arch, load_weights(design.arch, str(weights)))
    train_model(model, train, design.seg_steps, design.seg_batch, 1e-4, seed, device=design.device)
    metrics = evaluate_model(model, test, "seg", 32, design.device)
    return {k: float(metrics[k]) for k in ("pixel_aupr", "image_aupr")}


@torch.no_grad()
def manipulation_check(weights: Path, design: Design, seed: int, data: SeedData) -> dict[str, float]:
    """Mean cos(weak, weak') and cos(weak, blended weak') of pooled backbone features on held-out normals.

    Views at the pre-training size, drawn from seeds fixed per split seed (identical for every arm).
    """
    import torch.nn.functional as F

    from spotdiff.augment.smoothblend import SmoothBlend
    from spotdiff.augment.views import weak_augmentation
    from spotdiff.data.transforms import normalize
    from spotdiff.models import build_backbone

    net = build_backbone(design.arch, weights=str(weights)).eval().to(design.device)
    net.fc = torch.nn.Identity()
    normals = torch.stack([it["image"] for it in data.test if int(it["label"]) == 0])
    weak = weak_augmentation(design.pretrain_size)  # the views' size during pre-training
    blend = SmoothBlend(area=design.blend_area, aspect=BLEND_ASPECT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 + seed)
        a = torch.stack([weak(x) for x in normals])
        b = torch.stack([weak(x) for x in normals])
        c = blend(b, generator=torch.Generator().manual_seed(20_000 + seed))
    fa, fb, fc = (net(normalize(t).to(design.device)).float() for t in (a, b, c))
    pos = F.cosine_similarity(fa, fb, dim=1).mean().item()
    neg = F.cosine_similarity(fa, fc, dim=1).mean().item()
    return {"cos_weak_weak": pos, "cos_weak_blended": neg, "gap": pos - neg}


def run_cell(arm: str, seed: int, design: Design, data: SeedData, work: Path) -> dict[str, Any]:
    """Every endpoint of one (arm, seed) cell."""
    cell_dir = work / "cells" / f"{arm}_s{seed}"
    cell_dir.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    if arm == "start":
        raw = start_backbone(seed, design, cell_dir / "raw.safetensors")
    else:
        raw = pretrain_backbone(arm, seed, design, data.images, cell_dir / "run")
    pretrain_cpu = cpu_seconds() - c0
    bn = bn_reestimated(raw, data.train, design, cell_dir / "bn.safetensors")
    out: dict[str, Any] = {"pretrain_cpu_s": pretrain_cpu}
    for kind in ("padim", "patchcore"):
        out[f"{kind}_bn"] = detector_metrics(kind, bn, design, seed, data)
        out[f"{kind}_raw"] = detector_metrics(kind, raw, design, seed, data)
    out["seg10_bn"] = segmentation_metrics(bn, design, seed, data)
    out["manip"] = manipulation_check(bn, design, seed, data)
    out["cpu_s"] = cpu_seconds() - c0
    out["wall_s"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- statistics
def paired_stats(diffs: list[float]) -> dict[str, float]:
    """Mean, 95 % t-interval and exact two-sided Wilcoxon signed-rank p of paired differences."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.fmean(diffs) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "lo": math.nan, "hi": math.nan, "p_wilcoxon": math.nan}
    sd = statistics.stdev(diffs)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    if all(d == 0 for d in diffs):
        p = 1.0
    else:
        p = float(stats.wilcoxon(diffs, method="exact", zero_method="wilcox").pvalue)
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "p_wilcoxon": p}


ENDPOINTS = [  # (label, row key, metric); the first is the primary endpoint
    ("PaDiM pixel AU-PR (primary)", "padim_bn", "pixel_aupr"),
    ("PaDiM image AU-PR", "padim_bn", "image_aupr"),
    ("PaDiM AU-PRO", "padim_bn", "pixel_aupro"),
    ("PatchCore pixel AU-PR", "patchcore_bn", "pixel_aupr"),
    ("PatchCore image AU-PR", "patchcore_bn", "image_aupr"),
    ("10-shot U-Net pixel AU-PR", "seg10_bn", "pixel_aupr"),
    ("PaDiM pixel AU-PR, raw BN statistics", "padim_raw", "pixel_aupr"),
    ("PaDiM image AU-PR, raw BN statistics", "padim_raw", "image_aupr"),
]


def analyse(rows: list[dict[str, Any]], design: Design) -> str:
    """Markdown from finished cells: the primary endpoint, secondary ones, per-arm means, manipulation check."""
    cells = {(r["arm"], r["seed"]): r["metrics"] for r in rows}
    complete = sorted(s for s in range(design.seeds) if all((a, s) in cells for a in ARMS))
    status = "complete" if len(complete) == design.seeds else f"partial: {len(complete)} of {design.seeds} seeds"
    lines = [f"Status: **{status}** (seeds with every arm: {complete})", ""]

    def diffs(a: str, b: str, key: str, metric: str) -> list[float]:
        return [cells[(a, s)][key][metric] - cells[(b, s)][key][metric] for s in complete]

    def fmt(st: dict[str, float]) -> str:
        if st["n"] < 2:
            return f"{st['mean']:+.4f} | - | - | n = {st['n']}"
        return (
            f"{st['mean']:+.4f} | [{st['lo']:+.4f}, {st['hi']:+.4f}] | {st['p_wilcoxon']:.3g} | "
            f"{'yes' if st['lo'] > 0 or st['hi'] < 0 else 'no'}"
        )

    primary = paired_stats(diffs(*PRIMARY, "padim_bn", "pixel_aupr"))
    if primary["n"] < 2:
        verdict = "not estimable yet (an interval needs at least 2 complete seeds); no claim"
    elif primary["lo"] > 0 or primary["hi"] < 0:
        verdict = "an effect (the 95 % interval excludes 0)"
    else:
        verdict = "no effect shown (the 95 % interval includes 0)"
    lines += [
        f"**Primary endpoint** (PaDiM pixel AU-PR, spd_eta0.1 - spd_eta0, BN re-estimated, "
        f"n = {primary['n']} seeds): mean {primary['mean']:+.4f}, 95 % t-interval "
        f"[{primary['lo']:+.4f}, {primary['hi']:+.4f}], exact Wilcoxon p = {primary['p_wilcoxon']:.3g}: "
        f"{verdict}.",
        "",
        "Per seed: "
        + ", ".join(
            f"seed {s}: {cells[(PRIMARY[0], s)]['padim_bn']['pixel_aupr']:.4f} - "
            f"{cells[(PRIMARY[1], s)]['padim_bn']['pixel_aupr']:.4f} = "
            f"{cells[(PRIMARY[0], s)]['padim_bn']['pixel_aupr'] - cells[(PRIMARY[1], s)]['padim_bn']['pixel_aupr']:+.4f}"
            for s in complete
        )
        + ".",
        "",
    ]
    for title, (a, b) in (
        ("spd_eta0.1 - spd_eta0 (SPD gradient; the pre-registered pair)", PRIMARY),
        ("spd_eta0 - simsiam (the SPD path's extra passes without its gradient; reference)", ("spd_eta0", "simsiam")),
        ("simsiam - start (pre-training at all; reference)", ("simsiam", "start")),
    ):
        lines += [
            f"Paired differences, {title}:",
            "",
            "| endpoint | mean | 95 % t-interval | Wilcoxon p (exact) | excludes 0 |",
            "|---|---:|---:|---:|---|",
        ]
        for label, key, metric in ENDPOINTS:
            lines.append(f"| {label} | " + fmt(paired_stats(diffs(a, b, key, metric))) + " |")
        lines.append("")
    lines += [
        "Per arm, mean ± sd over the complete seeds:",
        "",
        "| arm | " + " | ".join(label for label, _, _ in ENDPOINTS) + " |",
        "|---|" + "---:|" * len(ENDPOINTS),
    ]
    for arm in ARMS:
        vals = [[cells[(arm, s)][k][m] for s in complete] for _, k, m in ENDPOINTS]
        lines.append(f"| {arm} | " + " | ".join(_mean_sd(v) for v in vals) + " |")
    lines += [
        "",
        "Manipulation check (held-out normals, pooled backbone features, BN re-estimated): "
        "mean cos(weak, weak'), cos(weak, blended), gap; `start` is every arm's 'before':",
        "",
        "| arm | cos(weak, weak') | cos(weak, blended) | gap | gap - start's gap (paired) |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        m = [cells[(arm, s)]["manip"] for s in complete]
        change = [cells[(arm, s)]["manip"]["gap"] - cells[("start", s)]["manip"]["gap"] for s in complete]
        lines.append(
            f"| {arm} | {_mean_sd([x['cos_weak_weak'] for x in m], 4)} | "
            f"{_mean_sd([x['cos_weak_blended'] for x in m], 4)} | {_mean_sd([x['gap'] for x in m], 5)} | "
            f"{_mean_sd(change, 5)} |"
        )
    lines += [
        "",
        "Every finished cell (complete seeds or not; descriptive):",
        "",
        "| arm | seed | PaDiM pixel AU-PR (BN / raw) | PaDiM image AU-PR (BN / raw) | PaDiM AU-PRO (BN) | "
        "PatchCore pixel AU-PR (BN / raw) | 10-shot U-Net pixel AU-PR | manipulation gap | CPU s (pre-training) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["seed"], ARMS.index(r["arm"]))):
        m = r["metrics"]
        lines.append(
            f"| {r['arm']} | {r['seed']} | {m['padim_bn']['pixel_aupr']:.4f} / {m['padim_raw']['pixel_aupr']:.4f} | "
            f"{m['padim_bn']['image_aupr']:.4f} / {m['padim_raw']['image_aupr']:.4f} | {m['padim_bn']['pixel_aupro']:.4f} | "
            f"{m['patchcore_bn']['pixel_aupr']:.4f} / {m['patchcore_raw']['pixel_aupr']:.4f} | "
            f"{m['seg10_bn']['pixel_aupr']:.4f} | {m['manip']['gap']:+.5f} | {m['cpu_s']:.0f} ({m['pretrain_cpu_s']:.0f}) |"
        )
    cpu = [r["metrics"]["cpu_s"] for r in rows]
    lines += [
        "",
        f"Cells finished: {len(rows)} of {design.seeds * len(ARMS)}; CPU time per cell "
        f"{_mean_sd(cpu, 0)} s (this process, all threads).",
    ]
    return "\n".join(lines) + "\n"


def _mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{mean:.{digits}f}{sd}"


# ----------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--design", choices=sorted(DESIGNS), default="cpu")
    p.add_argument("--tiny", action="store_true", help="the CI design (same as --design tiny)")
    p.add_argument("--seeds", type=int, default=None, help="override the design's number of seeds")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="magnetic-tile root (holds MT_Free)")
    p.add_argument("--work", type=Path, required=True, help="results.jsonl, analysis.md, caches (resumed)")
    p.add_argument("--prereg", type=Path, default=PREREG, help=argparse.SUPPRESS)
    p.add_argument("--cell", default=None, metavar="ARM:SEED", help="run only this cell (e.g. spd_eta0:3)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument(
        "--analyse", action="store_true", help="only (re)write WORK/analysis.md from the finished cells; run nothing"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args, argv)
    except SpotdiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    # Every module a cell uses, imported now: editing the work tree during a long run cannot change it.
    import spotdiff.detect.evaluate
    import spotdiff.finetune.train
    import spotdiff.models.bn
    import spotdiff.pretrain.train  # noqa: F401
    from spotdiff.progress import set_quiet

    name = "tiny" if args.tiny else args.design
    design = DESIGNS[name] if args.seeds is None else replace(DESIGNS[name], seeds=args.seeds)
    prereg = prereg_commit(args.prereg)  # before anything is written
    only: tuple[str, int] | None = None
    if args.cell is not None:
        arm, _, seed = args.cell.partition(":")
        if arm not in ARMS or not seed.isdigit():
            raise ConfigError(f"--cell {args.cell!r}: expected ARM:SEED with ARM one of {', '.join(ARMS)}")
        only = (arm, int(seed))
    if design.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--design {name}: needs a CUDA device")
    if not args.root.is_dir():
        raise ConfigError(f"{args.root}: magnetic-tile root not found")
    design_tag = design_record(design)
    results = args.work / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines() if line] if results.is_file() else []
    for r in rows:
        if r["prereg_commit"] != prereg:
            raise ConfigError(
                f"{results}: rows were run under pre-registration {r['prereg_commit'][:12]}, now "
                f"{prereg[:12]} ({args.prereg} changed after the run started); use a new --work"
            )
    mine = [r for r in rows if r["design"] == design_tag]
    done = {(r["arm"], r["seed"]) for r in mine}
    if args.analyse:
        text = analyse(mine, design)
        (args.work / "analysis.md").write_text(text)
        print(text, flush=True)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    set_quiet(True)
    code = code_commit()  # the code this process runs (read once, at start)
    command = "python benchmarks/spd_effect.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(
        f"# spd_effect {name}: {design_tag}; prereg {prereg[:12]}; code {code[:18]}; "
        f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    todo = [(a, s) for s in range(design.seeds) for a in ARMS]
    if only is not None:
        todo = [only]
    for arm, seed in todo:
        if (arm, seed) in done and only is None:
            continue
        data = seed_data(args.root, seed, design, args.work)
        metrics = run_cell(arm, seed, design, data, args.work)
        row = {
            "arm": arm,
            "seed": seed,
            "design_name": name,
            "design": design_tag,
            "metrics": metrics,
            "prereg_commit": prereg,
            "commit": code,
            "command": command,
            "load": os.getloadavg()[0],
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if only is not None:
            print(json.dumps(row), flush=True)
            (args.work / f"cell_{arm}_s{seed}.json").write_text(json.dumps(row) + "\n")
            return 0
        mine.append(row)
        with open(results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(
            f"{arm:<11} seed {seed}: PaDiM pixel AU-PR {metrics['padim_bn']['pixel_aupr']:.4f} "
            f"(raw {metrics['padim_raw']['pixel_aupr']:.4f}), seg {metrics['seg10_bn']['pixel_aupr']:.4f}, "
            f"gap {metrics['manip']['gap']:+.5f}; cpu {metrics['cpu_s']:.0f} s, wall {metrics['wall_s']:.0f} s",
            flush=True,
        )
        (args.work / "analysis.md").write_text(analyse(mine, design))
    text = analyse(mine, design)
    (args.work / "analysis.md").write_text(text)
    print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
