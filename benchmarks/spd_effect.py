"""Does SPD make the representation better for finding defects? Measured on real magnetic-tile images.

Protocol (issue 14):

* data: the magnetic-tile images (Huang et al. 2020), split by seed into training normals (80 % of
  ``MT_Free``) and a test set of the held-out normals plus every defect image with its mask;
* pre-training on the training normals only: SimSiam and SimSiam + SPD (eta sweep), optionally
  MoCo v2 +/- SPD, from the same initialisation, seed, steps and data (``spotdiff.pretrain``'s loop,
  the path ``spotdiff pretrain`` runs); seed s seeds the initialisation, data order, augmentations
  and SmoothBlend of every arm;
* references: the random initialisation the pre-training starts from, and torchvision's default
  random initialisation; ImageNet starts only when torchvision's weights are already in the local
  torch cache (never downloaded; skipped with a message otherwise);
* detectors fitted on the same training normals (PaDiM, optionally PatchCore), scored with
  ``spotdiff.metrics``: pixel AU-PR, image AU-PR, AU-PRO (FPR <= 0.3), image AU-ROC;
* per arm mean +/- std over seeds, and the paired difference arm - base per seed (mean, std, min,
  max).

The pre-training lr is 0.5 per 256 images (0.03 at batch 16), ours: at the recipes' 0.05 per 256
(0.003 at batch 16) a few dozen steps leave the backbone almost where it started (SimSiam's loss
moved from 0 to -0.009 in 30 steps), so base and SPD would be compared on nearly untrained weights.

Usage (repository root; the dataset is read in place, resized copies of the training normals go to
``--work``)::

    PYTHONPATH=src python benchmarks/spd_effect.py --budget small [--out benchmarks/results_spd_run.md]

Budgets (``--budget``; any field can be overridden by its own flag): see ``BUDGETS``. ``full`` is
sized to take about 90 minutes on 2 idle cores; ``small`` takes about 5. Both were run, see
``benchmarks/results_spd.md``.
Every finished (arm, seed) is appended to ``WORK/results.jsonl`` at once, and a rerun with the same
``--work`` skips what is there, so a stopped run can be continued.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from spotdiff.data import open_magnetic_tile
from spotdiff.detect import PaDiM, PatchCore
from spotdiff.detect.evaluate import evaluate_detector
from spotdiff.progress import set_quiet

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "magnetic_tile"
METRICS = ("pixel_aupr", "image_aupr", "pixel_aupro", "image_auroc")


@dataclass(frozen=True)
class Budget:
    """Everything that sets the cost of a run."""

    seeds: int  # seeds of every arm (paired across arms)
    steps: int  # pre-training optimizer steps
    batch: int  # pre-training images per step
    pretrain_size: int  # pre-training view side, px
    image_size: int  # detector image side, px
    sweep_seeds: int  # seeds of the eta = 0.3 and 1.0 arms (eta = 0.1 always gets ``seeds``)
    detectors: tuple[str, ...]  # "padim", "patchcore"
    moco: bool  # also MoCo v2 +/- SPD
    lr: float  # pre-training lr per 256 images (ours for short runs; see module docstring)


BUDGETS = {
    # a few minutes: checks the script end to end
    "smoke": Budget(seeds=2, steps=2, batch=8, pretrain_size=32, image_size=32, sweep_seeds=1,
                    detectors=("padim",), moco=False, lr=0.5),
    # what ran beside five other jobs on the shared 2-core machine (benchmarks/results_spd.md)
    "small": Budget(seeds=3, steps=20, batch=16, pretrain_size=32, image_size=48, sweep_seeds=1,
                    detectors=("padim",), moco=False, lr=0.5),
    # sized from this machine's measured units (2026-12-01, load ~4: SimSiam 80 steps 85 s, SimSiam+SPD
    # 169 s, PaDiM fit + test ~10 s), so that the whole script stays under about 90 minutes on 2 cores;
    # what ran (results_spd.md): 3 seeds for SimSiam +/- SPD at eta 0.1, one for eta 0.3 and 1.0
    "full": Budget(seeds=3, steps=200, batch=32, pretrain_size=64, image_size=64, sweep_seeds=1,
                   detectors=("padim",), moco=False, lr=0.5),
}


def arms(budget: Budget, imagenet: Path | None) -> list[dict[str, Any]]:
    """Every arm: ``{name, base, kind, method, spd, eta, weights, seeds}``; ``base`` names its pair."""
    out: list[dict[str, Any]] = [
        {"name": "random (torchvision init)", "kind": "random_tv"},
        {"name": "random (SimSiam start)", "kind": "random_start"},
        {"name": "SimSiam", "kind": "pretrain", "method": "simsiam", "spd": False, "eta": 0.1,
         "base": "random (SimSiam start)"},
        {"name": "SimSiam+SPD eta=0.1", "kind": "pretrain", "method": "simsiam", "spd": True, "eta": 0.1,
         "base": "SimSiam"},
        {"name": "SimSiam+SPD eta=0.3", "kind": "pretrain", "method": "simsiam", "spd": True, "eta": 0.3,
         "base": "SimSiam", "sweep": True},
        {"name": "SimSiam+SPD eta=1.0", "kind": "pretrain", "method": "simsiam", "spd": True, "eta": 1.0,
         "base": "SimSiam", "sweep": True},
    ]
    if budget.moco:
        out += [{"name": "MoCo v2", "kind": "pretrain", "method": "moco", "spd": False, "eta": 0.1},
                {"name": "MoCo v2+SPD eta=0.1", "kind": "pretrain", "method": "moco", "spd": True, "eta": 0.1,
                 "base": "MoCo v2"}]
    if imagenet is not None:
        out += [{"name": "ImageNet", "kind": "imagenet"},
                {"name": "ImageNet+SimSiam", "kind": "pretrain", "method": "simsiam", "spd": False, "eta": 0.1,
                 "weights": str(imagenet)},
                {"name": "ImageNet+SimSiam+SPD eta=0.1", "kind": "pretrain", "method": "simsiam", "spd": True,
                 "eta": 0.1, "weights": str(imagenet), "base": "ImageNet+SimSiam"}]
    for arm in out:  # torchvision's random init is a fixed reference: one seed is enough
        arm["seeds"] = 1 if arm["kind"] == "random_tv" else budget.sweep_seeds if arm.get("sweep") else budget.seeds
    return out


def cached_imagenet_weights(arch: str) -> Path | None:
    """torchvision's ImageNet weights file for ``arch`` if it is already in the torch hub cache."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).IMAGENET1K_V1
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return path if path.is_file() else None


def pretrain_folder(train: Any, work: Path, size: int) -> Path:
    """Square ``size`` px PNG copies of the training normals (quick to decode at every step)."""
    folder = work / f"train_normals_{size}px"
    if folder.is_dir() and len(list(folder.glob("*.png"))) == len(train.paths):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(train.paths):
        with Image.open(path) as img:
            img.convert("RGB").resize((size, size), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return folder


def same_unit(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two budgets give the same result for one (arm, seed, detector)."""
    return all(a.get(k) == b.get(k) for k in ("steps", "batch", "pretrain_size", "image_size", "lr"))


def decoded(dataset: Any, cache: Path) -> list[dict[str, Any]]:
    """Every item of ``dataset``, decoded once and kept in ``cache`` (tensors and strings only)."""
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    items = [dataset[i] for i in range(len(dataset))]
    torch.save(items, cache)
    return items


def pretrain(arm: dict[str, Any], seed: int, budget: Budget, images: Path, work: Path, arch: str) -> Path:
    """Pre-train one arm for one seed with spotdiff's loop; returns its exported backbone."""
    from spotdiff.pretrain.config import load_config
    from spotdiff.pretrain.train import BACKBONE_NAME, run_pretrain

    tag = (f"{arm['method']}_spd{int(arm['spd'])}_eta{arm['eta']}_{'in' if arm.get('weights') else 'rand'}_s{seed}"
           f"_{budget.steps}x{budget.batch}_{budget.pretrain_size}px_lr{budget.lr}")
    run_dir = work / "runs" / tag
    if (run_dir / BACKBONE_NAME).is_file():
        return run_dir / BACKBONE_NAME
    if run_dir.exists():  # an interrupted run: start it again
        import shutil

        shutil.rmtree(run_dir)
    hparams: dict[str, Any] = {}
    if arm["method"] == "moco":  # the queue may hold at most one epoch's images minus a batch
        n = len(list(images.glob("*.png")))
        hparams["queue_size"] = (n // budget.batch - 1) * budget.batch
    cfg = load_config(None, dict(
        method=arm["method"], spd=arm["spd"], eta=arm["eta"], arch=arch, data=str(images), out=str(run_dir),
        steps=budget.steps, batch_size=budget.batch, lr=budget.lr, image_size=budget.pretrain_size, workers=0,
        device="cpu", seed=seed, checkpoint_every=0, log_every=max(1, budget.steps // 10),
        tensorboard=False, weights=arm.get("weights"), hparams=hparams))
    run_pretrain(cfg)
    return run_dir / BACKBONE_NAME


def start_weights(seed: int, work: Path, arch: str) -> Path:
    """The exact backbone a SimSiam pre-training with ``seed`` starts from (built as the loop does)."""
    from spotdiff.pretrain.export import write_backbone
    from spotdiff.pretrain.methods import build_method

    path = work / "runs" / f"simsiam_start_s{seed}.safetensors"
    if not path.is_file():
        torch.manual_seed(seed)
        method = build_method("simsiam", arch=arch)
        write_backbone(method.backbone.state_dict(), arch, path, {"seed": seed})
    return path


def detect(name: str, weights: str | None, arch: str, seed: int, train: list, test: list) -> dict[str, float]:
    """Fit detector ``name`` on ``train`` and score ``test``; the headline metrics and timings."""
    cls = {"padim": PaDiM, "patchcore": PatchCore}[name]
    model = cls(arch=arch, weights=weights, seed=seed)
    t0 = time.perf_counter()
    model.fit(train)
    t1 = time.perf_counter()
    metrics, _, _, _ = evaluate_detector(model, test)
    out = {k: float(metrics[k]) for k in METRICS}
    out.update(fit_s=t1 - t0, test_s=time.perf_counter() - t1)
    return out


def summarise(rows: list[dict[str, Any]], arm_list: list[dict[str, Any]], detectors: tuple[str, ...]) -> str:
    """Markdown: per detector, mean +/- std per arm, then the paired differences arm - base."""
    lines = []
    for det in detectors:
        got = [r for r in rows if r["detector"] == det]
        by_arm = {a["name"]: {r["seed"]: r for r in got if r["arm"] == a["name"]} for a in arm_list}
        lines += [f"### {det}", "", "| arm | seeds | " + " | ".join(METRICS) + " | pre-train s |",
                  "|---|---:|" + "---:|" * (len(METRICS) + 1)]
        for arm in arm_list:
            per_seed = by_arm[arm["name"]]
            if not per_seed:
                continue
            cells = [_mean_std([r[m] for r in per_seed.values()]) for m in METRICS]
            pre = [r["pretrain_s"] for r in per_seed.values() if r.get("pretrain_s")]
            cells.append(f"{statistics.mean(pre):.0f}" if pre else "-")
            lines.append(f"| {arm['name']} | {len(per_seed)} | " + " | ".join(cells) + " |")
        lines += ["", "Paired differences (same seed): arm - base, mean +/- std over seeds [min, max]:", "",
                  "| arm - base | pairs | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
        for arm in arm_list:
            if "base" not in arm:
                continue
            pairs = sorted(set(by_arm[arm["name"]]) & set(by_arm[arm["base"]]))
            if not pairs:
                continue
            cells = []
            for m in METRICS:
                diffs = [by_arm[arm["name"]][s][m] - by_arm[arm["base"]][s][m] for s in pairs]
                cells.append(_mean_std(diffs, signed=True) + f" [{min(diffs):+.3f}, {max(diffs):+.3f}]")
            lines.append(f"| {arm['name']} - {arm['base']} | {len(pairs)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _mean_std(values: list[float], signed: bool = False) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return (f"{mean:+.3f}" if signed else f"{mean:.3f}") + ("" if math.isnan(std) else f" ± {std:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="magnetic-tile root (holds MT_Free)")
    p.add_argument("--work", type=Path, default=Path("/tmp/spd_effect"),
                   help="scratch folder: resized training normals, runs, results.jsonl (reused on rerun)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    for field, kind in (("seeds", int), ("steps", int), ("batch", int), ("pretrain_size", int),
                        ("image_size", int), ("sweep_seeds", int), ("lr", float)):
        p.add_argument("--" + field.replace("_", "-"), type=kind, default=None, help=f"override the budget's {field}")
    p.add_argument("--detectors", default=None, help="comma list of padim, patchcore (override)")
    p.add_argument("--moco", action="store_true", default=None, help="also MoCo v2 +/- SPD (override)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/test split of MT_Free")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=None, help="also write the summary markdown here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    budget = BUDGETS[args.budget]
    overrides = {k: getattr(args, k) for k in ("seeds", "steps", "batch", "pretrain_size", "image_size",
                                                "sweep_seeds", "moco", "lr") if getattr(args, k) is not None}
    if args.detectors:
        overrides["detectors"] = tuple(args.detectors.split(","))
    budget = replace(budget, **overrides)
    torch.set_num_threads(args.threads)
    set_quiet(True)
    args.work.mkdir(parents=True, exist_ok=True)
    imagenet = cached_imagenet_weights(args.arch)
    print(f"# spd_effect: budget {args.budget} {asdict(budget)}; {args.arch}; {platform.machine()}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; load {os.getloadavg()}", flush=True)
    if imagenet is None:
        print(f"ImageNet arms skipped: no torchvision {args.arch} ImageNet weights in {torch.hub.get_dir()}"
              "/checkpoints (this script never downloads)", flush=True)

    t0 = time.perf_counter()
    train_ds = open_magnetic_tile(args.root, "train", image_size=budget.image_size, seed=args.split_seed)
    test_ds = open_magnetic_tile(args.root, "test", image_size=budget.image_size, seed=args.split_seed)
    train = decoded(train_ds, args.work / f"train_{budget.image_size}px_split{args.split_seed}.pt")
    test = decoded(test_ds, args.work / f"test_{budget.image_size}px_split{args.split_seed}.pt")
    images = pretrain_folder(train_ds, args.work, max(budget.image_size, budget.pretrain_size))
    n_bad = sum(t["label"] for t in test)
    print(f"data: {len(train)} training normals; test {len(test) - n_bad} normal + {n_bad} defect images "
          f"(decoded in {time.perf_counter() - t0:.0f} s)", flush=True)

    results_path = args.work / "results.jsonl"
    rows = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.is_file() else []
    budget_tag = json.loads(json.dumps(asdict(budget)))  # as it reads back from results.jsonl
    mine = [r for r in rows if same_unit(r["budget"], budget_tag)]  # reusable results of earlier runs
    done = {(r["arm"], r["seed"], r["detector"]) for r in mine}
    arm_list = arms(budget, imagenet)
    # The paired main comparison first (every seed), then the eta sweep, then the references, so
    # that a run stopped early has the pairs.
    order = sorted(((arm.get("sweep", False), arm["kind"].startswith("random"), seed, i)
                    for i, arm in enumerate(arm_list) for seed in range(arm["seeds"])))
    for *_, seed, i in order:
        arm = arm_list[i]
        todo = [d for d in budget.detectors if (arm["name"], seed, d) not in done]
        if not todo:
            continue
        started = time.perf_counter()
        if arm["kind"] == "random_tv":
            weights = None
        elif arm["kind"] == "random_start":
            weights = str(start_weights(seed, args.work, args.arch))
        elif arm["kind"] == "imagenet":
            weights = str(imagenet)
        else:
            weights = str(pretrain(arm, seed, budget, images, args.work, args.arch))
        pretrain_s = time.perf_counter() - started if arm["kind"] == "pretrain" else 0.0
        for det in todo:
            result = detect(det, weights, args.arch, seed, train, test)
            row = {"arm": arm["name"], "seed": seed, "detector": det, "budget": budget_tag,
                   "pretrain_s": pretrain_s, **result, "load": os.getloadavg()[0]}
            mine.append(row)
            with open(results_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{arm['name']:<30} seed {seed} {det}: " + ", ".join(f"{m} {result[m]:.3f}" for m in METRICS)
                  + f" (pre-train {pretrain_s:.0f} s, fit {result['fit_s']:.0f} s, test {result['test_s']:.0f} s)",
                  flush=True)
    text = summarise(mine, arm_list, budget.detectors)
    print("\n" + text + f"\ntotal wall {time.perf_counter() - t0:.0f} s", flush=True)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
