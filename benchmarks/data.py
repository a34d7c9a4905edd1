"""Benchmark `spotdiff prepare` against an official-style serial copy, in the same process.

The peer ("official") follows the official VisA prepare_data.py: serial shutil.copyfile of every
image, decode + binarise + save of the masks it writes, no validation. spotdiff prepare also
decodes every image and mask first (validation) and compares bytes on reruns.

Usage: PYTHONPATH=src python benchmarks/data.py [--images 60] [--size 1000x750]
Prints a Markdown table of wall times and ratios to the peer.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from spotdiff.data.prepare import prepare_visa
from spotdiff.data.splits import read_split_csv
from spotdiff.progress import set_quiet


def make_tree(root: Path, n_images: int, w: int, h: int) -> None:
    """Raw VisA tree, object ``bench``: 2/3 normal train images, 1/3 anomalous test images."""
    rng = np.random.default_rng(0)
    rows = []
    base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    for i in range(n_images):
        anomalous = i % 3 == 2
        folder = "Anomaly" if anomalous else "Normal"
        img = root / "bench" / "Data" / "Images" / folder / f"{i:04d}.JPG"
        img.parent.mkdir(parents=True, exist_ok=True)
        noisy = np.clip(base.astype(int) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).resize((w, h), Image.BILINEAR).save(img, quality=95)
        mask = ""
        if anomalous:
            m = np.zeros((h, w), np.uint8)
            m[h // 4 : h // 2, w // 4 : w // 2] = 1 + i % 3
            mask_path = root / "bench" / "Data" / "Masks" / "Anomaly" / f"{i:04d}.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(mask_path)
            mask = mask_path.relative_to(root).as_posix()
        rows.append(
            (
                "bench",
                "test" if anomalous else "train",
                "anomaly" if anomalous else "normal",
                img.relative_to(root).as_posix(),
                mask,
            )
        )
    (root / "split_csv").mkdir()
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("object", "split", "label", "image", "mask"))
        writer.writerows(rows)


def official_style(root: Path, out: Path) -> None:
    """The official script's work for 1cls: copy images, binarise test masks; serial, unchecked."""
    for r in read_split_csv(root / "split_csv" / "1cls.csv"):
        label = "bad" if r.is_anomaly else "good"
        dst = out / "1cls" / r.object / r.split / label
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / r.image, dst / Path(r.image).name)
        if r.split == "test" and r.is_anomaly:
            gt = out / "1cls" / r.object / "ground_truth" / "bad"
            gt.mkdir(parents=True, exist_ok=True)
            arr = np.array(Image.open(root / r.mask))
            arr[arr != 0] = 255
            Image.fromarray(arr).save(gt / Path(r.mask).name)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--size", default="1000x750", help="WxH of the fake images (VisA: about 1500x1000)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_tree(tmp / "visa", args.images, w, h)
        best: dict[str, float] = {}
        for rep in range(args.repeats):
            for name, fn in [
                ("official-style serial copy (peer)", lambda rep=rep: official_style(tmp / "visa", tmp / f"o{rep}")),
                (
                    "spotdiff prepare, 1 worker",
                    lambda rep=rep: prepare_visa(tmp / "visa", "1cls", tmp / f"a{rep}", workers=1),
                ),
                (
                    "spotdiff prepare, 2 workers",
                    lambda rep=rep: prepare_visa(tmp / "visa", "1cls", tmp / f"b{rep}", workers=2),
                ),
                (
                    "spotdiff prepare rerun (all up to date), 2 workers",
                    lambda rep=rep: prepare_visa(tmp / "visa", "1cls", tmp / f"b{rep}", workers=2),
                ),
            ]:
                best[name] = min(best.get(name, float("inf")), timed(fn))
        peer = best["official-style serial copy (peer)"]
        print(f"{args.images} images of {w}x{h} px ({args.images // 3} with masks), best of {args.repeats}\n")
        print("| run | wall s | ratio to peer |\n|---|---:|---:|")
        for name, sec in best.items():
            print(f"| {name} | {sec:.3f} | {sec / peer:.2f} |")


if __name__ == "__main__":
    main()
