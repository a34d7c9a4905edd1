"""Benchmark `spotdiff synth`: generation speed, and a check that its defects are detectable.

1. Speed: ``generate`` at ``--scale`` into a temporary directory, timed in wall and CPU seconds,
   against a peer run in the same process: reading every written image and mask back once with
   ``spotdiff.data.io`` (the cost of one pass over the dataset). Also per-object render rates.
2. Detectability (``--detect``): a small PaDiM on *randomly initialised* ResNet-18 features
   (layer1 + layer2, 64 random channels, one Gaussian per feature position) fitted on the 1cls
   train normals and scored on the 1cls test split with ``spotdiff.metrics.evaluate``. It
   shows that the defects are found above chance without any pre-training, and how far from
   trivial the data is. It is a sanity check of the data, not spotdiff's detector.

Usage: PYTHONPATH=src python benchmarks/synth_bench.py [--scale 1.0] [--detect] [--detect-size 128] [--detect-scale 2.0]
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from spotdiff.data.io import load_image, load_mask
from spotdiff.data.synth import OBJECTS, generate, image_counts, render_sample
from spotdiff.progress import set_quiet


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def speed(scale: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, gen_wall, gen_cpu = _timed(lambda: generate(Path(tmp) / "synth", seed=0, scale=scale))
        files = [p for p in root.rglob("*") if p.suffix in (".JPG", ".png")]
        n_images = sum(p.suffix == ".JPG" for p in files)

        def read_all() -> None:
            for p in files:
                load_image(p) if p.suffix == ".JPG" else load_mask(p)

        _, read_wall, read_cpu = _timed(read_all)
        size_mb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
    print(f"## Generation speed (scale {scale}: {n_images} images of 256x256 + masks, {size_mb:.1f} MiB)\n")
    print("| step | wall s | CPU s | images/s (CPU) | ratio to peer (CPU) |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| generate (render + JPEG/PNG + CSVs) | {gen_wall:.2f} | {gen_cpu:.2f} | {n_images / gen_cpu:.0f} | {gen_cpu / read_cpu:.1f} |"
    )
    print(
        f"| peer: read every image and mask once | {read_wall:.2f} | {read_cpu:.2f} | {n_images / read_cpu:.0f} | 1.0 |"
    )
    print("\n| object | normal renders/s (CPU) | anomalous renders/s (CPU) |")
    print("|---|---:|---:|")
    for name, obj in OBJECTS.items():
        rates = []
        for anomalous in (False, True):
            n = 24
            _, _, cpu = _timed(lambda a=anomalous, obj=obj, n=n: [render_sample(obj, 0, i, a, 256) for i in range(n)])
            rates.append(n / cpu)
        print(f"| {name} | {rates[0]:.0f} | {rates[1]:.0f} |")


def detectability(scale: float, size: int) -> None:
    import torch
    import torch.nn.functional as F

    from spotdiff.data import open_dataset
    from spotdiff.data.transforms import normalize
    from spotdiff.metrics import evaluate
    from spotdiff.models import build_backbone, extract_features

    torch.manual_seed(0)
    model = build_backbone("resnet18").eval()
    channels = torch.randperm(64 + 128, generator=torch.Generator().manual_seed(0))[:64]

    def embed(dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats, labels, masks = [], [], []
        loader = torch.utils.data.DataLoader(dataset, batch_size=16)
        with torch.no_grad():
            for batch in loader:
                f = extract_features(model, normalize(batch["image"]), ["layer1", "layer2"])
                l2 = F.interpolate(f["layer2"], size=f["layer1"].shape[-2:], mode="bilinear", align_corners=False)
                feats.append(torch.cat([f["layer1"], l2], 1)[:, channels])
                labels.append(batch["label"])
                masks.append(batch["mask"])
        return torch.cat(feats), torch.cat(labels), torch.cat(masks)

    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "synth", seed=0, scale=scale)
        print(f"\n## Detectability: PaDiM on random ResNet-18 features ({size}x{size}, 1cls split, scale {scale})\n")
        print("| object | train normals | test normal / anomalous | image AUROC | pixel AUROC |")
        print("|---|---:|---:|---:|---:|")
        for name in OBJECTS:
            train, _, _ = embed(open_dataset(root, name, "1cls", "train", image_size=size))
            test, labels, masks = embed(open_dataset(root, name, "1cls", "test", image_size=size))
            n, c, h, w = train.shape
            x = train.permute(2, 3, 0, 1).reshape(h * w, n, c).double()
            mean = x.mean(1, keepdim=True)
            cov = (x - mean).transpose(1, 2) @ (x - mean) / (n - 1) + 0.01 * torch.eye(c, dtype=torch.float64)
            inv = torch.linalg.inv(cov)
            y = test.permute(2, 3, 0, 1).reshape(h * w, -1, c).double() - mean
            dist = torch.einsum("pbc,pcd,pbd->pb", y, inv, y).clamp_min(0).sqrt()
            maps = dist.T.reshape(-1, 1, h, w).float()
            maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            scores = maps.flatten(1).max(1).values
            res = evaluate(scores.numpy(), labels.numpy(), anomaly_maps=maps.numpy(), masks=masks.numpy())
            n_test_normal = int((labels == 0).sum())
            print(
                f"| {name} | {n} | {n_test_normal} / {len(labels) - n_test_normal} | "
                f"{res['image_auroc']:.3f} | {res['pixel_auroc']:.3f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--detect", action="store_true", help="also run the random-feature PaDiM check")
    parser.add_argument("--detect-size", type=int, default=128)
    parser.add_argument(
        "--detect-scale",
        type=float,
        default=2.0,
        help="dataset scale of the detection check (2.0: 32 normal + 71 anomalous test images per object)",
    )
    args = parser.parse_args()
    set_quiet(True)
    n_normal, n_anomalous = image_counts(args.scale)
    print(
        f"machine: {platform.machine()}, Python {platform.python_version()}; "
        f"{len(OBJECTS)} objects x ({n_normal} normal + {n_anomalous} anomalous)\n"
    )
    speed(args.scale)
    if args.detect:
        detectability(args.detect_scale, args.detect_size)


if __name__ == "__main__":
    main()
