"""Predict speed on CPU: the torch path vs the exported ONNX graph under onnxruntime, same images, one run.

For each model (PaDiM and PatchCore, random-init ResNet-18 at 256 px by default; speed does not
depend on the weights' values), fit on synthetic normal images, export with `spotdiff export`,
then time ``predict`` on the same tensors with both back ends, alternating rounds so machine load
hits both alike. Each side gets the same thread count. Reports images/s (best and median round),
the ratio, process CPU time per image, and the largest relative difference of maps and scores.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/deploy_bench.py [--image-size 256] [--train 40] [--images 16]
        [--rounds 5] [--threads 1] [--models padim,patchcore]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spotdiff.detect import PaDiM, PatchCore
from spotdiff.detect.export import export_onnx
from spotdiff.detect.onnx_runtime import OnnxDetector


def synthetic(n: int, size: int, seed: int) -> torch.Tensor:
    """``(n, 3, size, size)`` textured grey images in [0, 1] (low-frequency pattern plus noise)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(
        torch.rand(n, 3, size // 16, size // 16, generator=g), size=(size, size), mode="bilinear", align_corners=False
    )
    return (0.3 + 0.4 * base + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def timed(fn, images: torch.Tensor) -> tuple[float, float, tuple[torch.Tensor, torch.Tensor]]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(images)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def bench(name: str, args: argparse.Namespace, tmp: Path) -> None:
    model = {"padim": PaDiM(arch="resnet18"), "patchcore": PatchCore(arch="resnet18")}[name]
    t0 = time.perf_counter()
    model.fit([{"image": x} for x in synthetic(args.train, args.image_size, seed=0)])
    model.save(tmp / name)
    t1 = time.perf_counter()
    export_onnx(tmp / name, tmp / f"{name}.onnx")
    t2 = time.perf_counter()
    runner = OnnxDetector(tmp / name, tmp / f"{name}.onnx", threads=args.threads)
    images = synthetic(args.images, args.image_size, seed=1)
    runs: dict[str, list[tuple[float, float]]] = {"torch": [], "onnxruntime": []}
    outs = {}
    for _ in range(args.rounds):
        for backend, fn in (("torch", model.predict), ("onnxruntime", runner.predict)):
            wall, cpu, outs[backend] = timed(fn, images)
            runs[backend].append((wall, cpu))
    (ts, tm), (os_, om) = outs["torch"], outs["onnxruntime"]
    rel_maps = float(((om - tm).abs() / tm.abs()).max())
    rel_scores = float(((os_ - ts).abs() / ts.abs()).max())
    onnx_mb = (tmp / f"{name}.onnx").stat().st_size / 2**20
    print(
        f"\n### {name}, resnet18, {args.image_size} px, {args.train} training images, {args.images} images x "
        f"{args.rounds} rounds, {args.threads} thread(s) each\n"
    )
    print(
        f"fit {t1 - t0:.1f} s, export {t2 - t1:.1f} s, ONNX file {onnx_mb:.0f} MB; "
        f"max relative difference onnxruntime vs torch: maps {rel_maps:.2e}, scores {rel_scores:.2e}\n"
    )
    print("| back end | images/s (best round) | images/s (median) | CPU s per image (median) |")
    print("|---|---:|---:|---:|")
    rate = {}
    for backend, rows in runs.items():
        best = args.images / min(w for w, _ in rows)
        median = args.images / statistics.median(w for w, _ in rows)
        cpu = statistics.median(c for _, c in rows) / args.images
        rate[backend] = (best, median, cpu)
        print(f"| {backend} | {best:.2f} | {median:.2f} | {cpu:.3f} |")
    print(
        f"\nonnxruntime / torch: {rate['onnxruntime'][0] / rate['torch'][0]:.2f}x (best), "
        f"{rate['onnxruntime'][1] / rate['torch'][1]:.2f}x (median), "
        f"{rate['torch'][2] / rate['onnxruntime'][2]:.2f}x (CPU time)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--train", type=int, default=40, help="training images (default 40)")
    parser.add_argument("--images", type=int, default=16, help="images predicted per round (default 16)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="padim,patchcore")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# deploy_bench: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            bench(name, args, Path(tmp))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
