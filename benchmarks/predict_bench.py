"""predict's pipeline against the model alone, in the same run (issue 26, item 1).

For each image set and back end, three throughputs (images/s) on the same images and model:

* ``model``: the model in-process on images already decoded and resized to its size (batches of
  ``--batch-size``): the ceiling;
* ``cli_scores``: ``predict_images`` (what ``spotdiff predict`` runs after loading the model) with
  ``--no-overlays``: decoding, resizing, model, decisions, ``scores.csv``;
* ``cli_all``: the same with overlays and masks.

Reported as ratios to ``model`` (aims: >= 0.8 without overlays, >= 0.5 with overlays and masks).
Image sets: synthetic 900x900 PNGs and 1500x1000 JPEGs written to a temporary folder, and the
magnetic-tile JPEGs (``../shared/realdata/magnetic_tile/MT_Free/Imgs``, skipped if absent).
Model: PaDiM, ResNet-18 (random init: speed does not depend on the weights), 256 px, d=100.

    PYTHONPATH=src python benchmarks/predict_bench.py [--images 48] [--threads 2] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spotdiff.data.io import load_image
from spotdiff.data.loader import decode_workers
from spotdiff.data.transforms import image_to_tensor
from spotdiff.detect import PaDiM
from spotdiff.detect.calibration import calibrate
from spotdiff.detect.predict import predict_images
from spotdiff.progress import set_quiet

MAGTILE = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "magnetic_tile" / "MT_Free" / "Imgs"


def synthetic(folder: Path, n: int, size: tuple[int, int], fmt: str, seed: int = 0) -> Path:
    """``n`` textured images of ``size`` (H, W) with a few bright blobs, as ``fmt`` (png / jpg)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = (120 + 30 * np.sin(xx / 23.0) * np.cos(yy / 31.0))[..., None]
    for i in range(n):
        img = base + rng.normal(0, 12, (h, w, 3))
        cy, cx = rng.integers(50, h - 50), rng.integers(50, w - 50)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 400] = 230
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.{fmt}", quality=90)
    return folder


def model_throughput(model: PaDiM, tensors: torch.Tensor, batch: int) -> float:
    """Images/s of ``model.predict`` on pre-decoded, pre-resized images ``tensors`` (N, 3, H, W)."""
    start = time.perf_counter()
    for i in range(0, len(tensors), batch):
        model.predict(tensors[i : i + batch])
    return len(tensors) / (time.perf_counter() - start)


def pipeline_throughput(
    model: object, folder: Path, out: Path, batch: int, workers: int | None, overlays: bool, masks: bool
) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    rows = predict_images(model, [folder], out, batch_size=batch, overlays=overlays, masks=masks, num_workers=workers)
    elapsed = time.perf_counter() - start
    assert not any(r["error"] for r in rows)
    return len(rows) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48, help="images per set")
    ap.add_argument("--threads", type=int, default=2, help="torch / onnxruntime intra-op threads")
    ap.add_argument("--workers", type=int, default=None, help="decode / write threads (default: decode_workers())")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backends", default="torch,onnxruntime")
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="rounds of (model, predict, predict + overlays), interleaved; the best of each is kept "
        "(the load of a shared machine varies by seconds)",
    )
    args = ap.parse_args()
    set_quiet(True)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"# predict_bench: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}), load {load[0]:.1f}/{load[1]:.1f}, "
        f"torch {torch.__version__}, threads {args.threads}, workers {decode_workers(args.workers)}, "
        f"batch {args.batch_size}, {args.images} images per set"
    )
    work = Path(tempfile.mkdtemp(prefix="predict_bench-"))
    try:
        sets = {
            "900x900 PNG": synthetic(work / "png", args.images, (900, 900), "png"),
            "1500x1000 JPEG": synthetic(work / "jpg", args.images, (1000, 1500), "jpg", seed=1),
        }
        if MAGTILE.is_dir():
            tiles = sorted(MAGTILE.glob("*.jpg"))[: args.images]
            folder = work / "magtile"
            folder.mkdir()
            for p in tiles:
                shutil.copyfile(p, folder / p.name)
            sets["magnetic tile JPEG"] = folder
        train = [
            {"image": image_to_tensor(load_image(p), 256)}
            for p in sorted(synthetic(work / "train", 16, (256, 256), "png", seed=2).iterdir())
        ]
        model = PaDiM(arch="resnet18", d=100, weights=None)
        model.fit(train[:12])
        calibrate(model, train[12:])  # thresholds for the decisions and masks
        model.save(work / "model")
        runners: dict[str, object] = {"torch": model}
        if "onnxruntime" in args.backends:
            from spotdiff.detect.export import export_onnx
            from spotdiff.detect.onnx_runtime import OnnxDetector

            export_onnx(work / "model", work / "model.onnx")
            runners["onnxruntime"] = OnnxDetector(work / "model", work / "model.onnx", threads=args.threads)
        print(
            "| images | back end | model img/s | predict, no overlays img/s (ratio) | "
            "predict + overlays + masks img/s (ratio) |"
        )
        print("|---|---|---|---|---|")
        for name, folder in sets.items():
            paths = sorted(folder.iterdir())
            tensors = torch.stack([image_to_tensor(load_image(p), model.image_size_) for p in paths])
            for backend in args.backends.split(","):
                runner = runners[backend]
                ceiling = bare = full = 0.0
                for _ in range(args.repeats):
                    ceiling = max(ceiling, model_throughput(runner, tensors, args.batch_size))  # type: ignore[arg-type]
                    bare = max(
                        bare,
                        pipeline_throughput(runner, folder, work / "out", args.batch_size, args.workers, False, False),
                    )
                    full = max(
                        full,
                        pipeline_throughput(runner, folder, work / "out", args.batch_size, args.workers, True, True),
                    )
                print(
                    f"| {name} ({len(paths)}) | {backend} | {ceiling:.1f} | {bare:.1f} ({bare / ceiling:.2f}x) | "
                    f"{full:.1f} ({full / ceiling:.2f}x) |",
                    flush=True,
                )
        end = os.getloadavg()
        print(f"# load at the end {end[0]:.1f}/{end[1]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
