"""The whole deployment path on real images nobody tuned for (issue 23, item 7).

folders -> ``spotdiff fit`` (calibrated on a held-out share) -> ``spotdiff test`` (decisions at the
model's own thresholds) -> ``spotdiff predict`` (torch) -> ``spotdiff export`` (ONNX) ->
``spotdiff predict --backend onnxruntime``, each as a user runs it (a subprocess of the CLI), on the
magnetic-tile images (Huang et al. 2020) in ``../shared/realdata/magnetic_tile``, read in place.

The dataset keeps each image (``.jpg``) and its mask (``.png``) side by side in
``MT_<Type>/Imgs/``; a user hands spotdiff separate image and mask folders, so the script stages
them as symbolic links (never copies); its masks are not strictly binary (PNG values 0-255 around
the defect edges), so ``test`` gets ``--mask-threshold 127`` (a pixel is a defect when its value is
>= 128, the dataset reader's rule, ``spotdiff.data.magtile``); ``train/`` and ``test/good/`` from a seeded split of
``MT_Free``, ``test/bad/<Type>/`` and ``test/masks/<Type>/`` for the defect types. Backbones are
random-init (no ImageNet file offline), so absolute detection figures are low: the point is that
the path runs on real images and that its decisions are what the calibration promised.

Recorded: false-alarm rate on good images, recall overall and per defect type, precision, pixel
FPR on good images as ``predict --masks`` writes them, and ``predict``'s images/s against the
same model's in-process throughput on the same (pre-decoded) images, measured in the same run.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/deploy_realdata.py [--train 200 --good 50 --per-type 15]
        [--image-size 256] [--threads 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "realdata" / "magnetic_tile"


def stage(data: Path, work: Path, n_train: int, n_good: int, per_type: int, seed: int) -> dict[str, int]:
    """Symbolic links to the dataset's files in the folder layout a user gives spotdiff."""
    rng = np.random.default_rng(seed)
    free = sorted((data / "MT_Free" / "Imgs").glob("*.jpg"))
    order = rng.permutation(len(free))
    picks = {
        "train": [free[i] for i in order[:n_train]],
        "test/good": [free[i] for i in order[n_train : n_train + n_good]],
    }
    counts = {k: len(v) for k, v in picks.items()}
    for folder, files in picks.items():
        (work / folder).mkdir(parents=True)
        for f in files:
            (work / folder / f.name).symlink_to(f)
    for type_dir in sorted(data.glob("MT_*")):
        name = type_dir.name.removeprefix("MT_")
        if name == "Free":
            continue
        images = sorted((type_dir / "Imgs").glob("*.jpg"))
        chosen = [images[i] for i in sorted(rng.permutation(len(images))[:per_type])]
        for sub in ("test/bad", "test/masks"):
            (work / sub / name).mkdir(parents=True)
        for img in chosen:
            (work / "test/bad" / name / img.name).symlink_to(img)
            (work / "test/masks" / name / img.with_suffix(".png").name).symlink_to(img.with_suffix(".png"))
        counts[f"bad/{name}"] = len(chosen)
    return counts


def cli(args: list[str], threads: int) -> dict[str, float]:
    """Run ``python -m spotdiff ...``; wall and CPU seconds of the child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "spotdiff", "--quiet", "--threads", str(threads), *args], capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):
        sys.exit(f"spotdiff {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "rc": done.returncode, "stdout": done.stdout}


def in_process_rate(model_dir: Path, images: list[Path], threads: int, onnx: Path | None = None) -> float:
    """Images per CPU-second of the model alone (``predict`` on pre-decoded tensors, forward batch),
    best of 2; CPU time, so that other jobs on the machine do not move it."""
    import torch

    from spotdiff.data.io import load_image
    from spotdiff.data.transforms import image_to_tensor
    from spotdiff.detect import load_detector

    torch.set_num_threads(threads)
    model = load_detector(model_dir)
    if onnx is not None:
        from spotdiff.detect.onnx_runtime import OnnxDetector

        model = OnnxDetector(model_dir, onnx, threads=threads)
    size = model.image_size_
    tensors = torch.stack([image_to_tensor(load_image(p), size) for p in images])
    step = model.forward_batch
    best = float("inf")
    for _ in range(2):
        start = time.process_time()
        for i in range(0, len(tensors), step):
            model.predict(tensors[i : i + step])
        best = min(best, time.process_time() - start)
    return len(images) / best


def mask_fpr_on_good(pred_dir: Path, good: set[str]) -> float:
    """Fraction of pixels of the good images that ``predict --masks`` marks as defect."""
    flagged = total = 0
    with open(pred_dir / "scores.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if Path(row["path"]).name not in good:
                continue
            mask = np.asarray(Image.open(pred_dir / row["mask"])) if row.get("mask") else None
            if mask is None:
                continue
            flagged += int((mask > 0).sum())
            total += mask.size
    return flagged / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spotdiff-deploy-realdata"))
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--good", type=int, default=50)
    parser.add_argument("--per-type", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.work.exists():
        sys.exit(f"{args.work}: exists; give a new --work folder")
    work = args.work
    counts = stage(args.data, work, args.train, args.good, args.per_type, args.seed)
    load = os.getloadavg()[0]
    t = args.threads
    model, onnx = work / "model", work / "model.onnx"
    steps = {
        "fit": cli(
            [
                "fit",
                "--model",
                "padim",
                "--arch",
                "resnet18",
                "--image-size",
                str(args.image_size),
                "--weights",
                "random",
                "--seed",
                str(args.seed),
                "--train",
                str(work / "train"),
                "--out",
                str(model),
            ],
            t,
        )
    }
    steps["test"] = cli(
        [
            "test",
            str(model),
            "--good",
            str(work / "test/good"),
            "--bad",
            str(work / "test/bad"),
            "--masks",
            str(work / "test/masks"),
            "--mask-threshold",
            "127",
            "--out",
            str(work / "results"),
        ],
        t,
    )
    test_images = [str(work / "test/good"), str(work / "test/bad")]
    steps["predict torch"] = cli(["predict", str(model), *test_images, "--masks", "--out", str(work / "pred-torch")], t)
    steps["predict torch, no overlays"] = cli(
        ["predict", str(model), *test_images, "--no-overlays", "--out", str(work / "pred-torch-plain")], t
    )
    steps["export"] = cli(["export", str(model), "--format", "onnx", "--out", str(onnx)], t)
    steps["predict onnxruntime"] = cli(
        [
            "predict",
            str(model),
            *test_images,
            "--masks",
            "--backend",
            "onnxruntime",
            "--onnx",
            str(onnx),
            "--out",
            str(work / "pred-ort"),
        ],
        t,
    )
    steps["predict onnxruntime, no overlays"] = cli(
        [
            "predict",
            str(model),
            *test_images,
            "--no-overlays",
            "--backend",
            "onnxruntime",
            "--onnx",
            str(onnx),
            "--out",
            str(work / "pred-ort-plain"),
        ],
        t,
    )
    files = sorted(p for p in (work / "test").rglob("*.jpg"))
    n = len(files)
    peer = {"torch": in_process_rate(model, files, t), "onnxruntime": in_process_rate(model, files, t, onnx)}
    metrics = json.loads((work / "results" / "metrics.json").read_text())
    decisions = metrics["decisions"]
    good_names = {p.name for p in (work / "test/good").iterdir()}
    pixel_fpr = {b: mask_fpr_on_good(work / f"pred-{b}", good_names) for b in ("torch", "ort")}

    print(
        f"\n### deploy_realdata.py, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end, {t} thread(s)\n"
    )
    print(
        f"PaDiM ResNet-18 (random init), {args.image_size} px, split seed {args.seed}; staged: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + ".\n"
    )
    c = decisions["confusion"]
    print("| decision figure (model's own thresholds) | value |\n|---|---:|")
    print(
        f"| image threshold / pixel threshold | {decisions['image_threshold']:.3f} / "
        f"{decisions['pixel_threshold']:.3f} |"
    )
    print(
        f"| false alarms on good test images | {c['false_positive']} of {c['false_positive'] + c['true_negative']} "
        f"({decisions['false_alarm_rate']:.3f}) |"
    )
    print(
        f"| recall on defective images | {c['true_positive']} of {c['true_positive'] + c['false_negative']} "
        f"({decisions['recall']:.3f}) |"
    )
    print(f"| precision | {decisions['precision']:.3f} |")
    for name, entry in decisions["per_defect_type"].items():
        print(f"| recall, {name} | {entry['detected']} of {entry['images']} ({entry['recall']:.3f}) |")
    print(f"| pixel FPR, all normal pixels (test) | {decisions['pixel']['fpr']:.4f} |")
    print(f"| pixel FPR on good images, `test` | {decisions['pixel']['fpr_good_images']:.4f} |")
    print(
        f"| pixel FPR on good images, `predict --masks` torch / onnxruntime | {pixel_fpr['torch']:.4f} / "
        f"{pixel_fpr['ort']:.4f} |"
    )
    print(
        f"| image AU-ROC / AU-PR; pixel AU-PR | {metrics['image_auroc']:.3f} / {metrics['image_aupr']:.3f}; "
        f"{metrics.get('pixel_aupr', float('nan')):.3f} |"
    )
    print(
        f"\n| step ({n} test images) | wall s | CPU s | images per CPU-s | / in-process model |\n"
        "|---|---:|---:|---:|---:|"
    )
    for name, s in steps.items():
        rate = n / s["cpu_s"] if name.startswith("predict") else None
        backend = "onnxruntime" if "onnxruntime" in name else "torch"
        ratio = f"{rate / peer[backend]:.2f}" if rate else ""
        print(f"| {name} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | {f'{rate:.1f}' if rate else ''} | {ratio} |")
    print(
        f"| in-process model (pre-decoded), torch / onnxruntime | | | {peer['torch']:.1f} / "
        f"{peer['onnxruntime']:.1f} | 1 |"
    )
    print(
        "\nCPU seconds of each command include its start (interpreter, torch import, model load and, "
        "for onnxruntime, the content check and probe run); images per CPU-second is the test set over them."
    )


if __name__ == "__main__":
    main()
