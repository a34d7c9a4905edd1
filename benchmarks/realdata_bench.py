"""Real-data sanity check: PaDiM and PatchCore on the seeded magnetic-tile split.

Backbones are randomly initialised (seeded): no ImageNet weights are available offline, so the
numbers are far below published ones. The point is that the whole pipeline (loader, split,
detector, metrics) runs on real images and scores defects above chance.

Usage (from the repository root; the dataset is read in place, never copied)::

    PYTHONPATH=src python benchmarks/realdata_bench.py [--root ../shared/realdata/magnetic_tile]
        [--image-size 128] [--models padim-resnet18,patchcore-resnet18,padim-wide_resnet50_2]

Prints one markdown block per model (overall metrics, per-defect-type breakdown, wall times) as
soon as it is done, so a partial run is still usable.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import torch

from spotdiff.data import open_magnetic_tile
from spotdiff.detect import PaDiM, PatchCore
from spotdiff.detect.evaluate import evaluate_detector

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "magnetic_tile"
HEADLINE = ("image_auroc", "image_aupr", "pixel_auroc", "pixel_aupr", "pixel_aupro")


def build(name: str, seed: int) -> PaDiM | PatchCore:
    """``padim-<arch>`` or ``patchcore-<arch>``, random-init backbone, default method settings."""
    method, arch = name.split("-", 1)
    if method == "padim":
        return PaDiM(arch=arch, seed=seed)
    if method == "patchcore":
        return PatchCore(arch=arch, seed=seed)
    raise SystemExit(f"unknown model {name!r}: expected padim-<arch> or patchcore-<arch>")


def fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def run_one(name: str, root: Path, size: int, seed: int) -> None:
    train = open_magnetic_tile(root, "train", image_size=size, seed=seed)
    test = open_magnetic_tile(root, "test", image_size=size, seed=seed)
    model = build(name, seed)
    t0 = time.perf_counter()
    model.fit(train)
    t1 = time.perf_counter()
    metrics, _, _, _ = evaluate_detector(model, test)
    t2 = time.perf_counter()
    print(f"\n### {name}, {size} px, random-init backbone, split seed {seed}\n")
    print(
        f"train {len(train)} normal images; test {len(test)} ({len(test) - sum(test.labels)} normal, "
        f"{sum(test.labels)} anomalous). fit {t1 - t0:.1f} s, test {t2 - t1:.1f} s "
        f"({1000 * (t2 - t1) / len(test):.0f} ms/image).\n"
    )
    print("| subset | " + " | ".join(HEADLINE) + " |")
    print("|---|" + "---:|" * len(HEADLINE))
    print("| all | " + " | ".join(fmt(metrics[k]) for k in HEADLINE) + " |")
    for defect_type, m in sorted(metrics["per_defect_type"].items()):
        count = sum(r.defect_type == defect_type for r in test.records)
        print(f"| {defect_type} ({count}) | " + " | ".join(fmt(m.get(k)) for k in HEADLINE) + " |")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="split, backbone-init, channel and coreset seed")
    parser.add_argument("--models", default="padim-resnet18,patchcore-resnet18,padim-wide_resnet50_2")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"magnetic tile, {platform.machine()} {torch.get_num_threads()} thread(s), Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )
    for name in args.models.split(","):
        run_one(name, args.root, args.image_size, args.seed)


if __name__ == "__main__":
    main()
