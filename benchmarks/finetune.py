"""Benchmark the fine-tuning data path and training step, as ratios within one process.

1. Data path, per training batch (no model): spotdiff's in-memory uint8 cache + per-image v2
   augmentation, against the peer "decode every batch" loop (the dataset read through a
   DataLoader each step, then the same augmentation), the usual way a training script reads
   images. The cache's one-off decode cost is reported too.
2. Training step (augmentation + forward + backward + AdamW): U-Net against the classifier,
   same backbone and batch.

Data: the synthetic VisA-format dataset (``spotdiff.data.synth``), object ``pcb_synth``,
high-shot train subset.

Usage: PYTHONPATH=src python benchmarks/finetune.py [--disk-size 512] [--size 128] [--batches 10]
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from spotdiff.data.synth import generate
from spotdiff.data.transforms import normalize
from spotdiff.finetune import build_model, get_protocol, open_protocol
from spotdiff.finetune.train import _param_groups, augment_batch, batch_indices, load_tensors, make_augmentation
from spotdiff.progress import set_quiet


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk-size", type=int, default=512, help="synthetic image size on disk (px)")
    parser.add_argument("--size", type=int, default=128, help="training input size (px)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    set_quiet(True)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "visa", seed=0, scale=0.5, image_size=args.disk_size, objects=["pcb_synth"])
        data = open_protocol(root, "pcb_synth", get_protocol("highshot"), image_size=args.size)
        pool = data.train_pool
        labels = list(pool.labels)
        transform = make_augmentation(args.size)
        batches = list(batch_indices(labels, args.batch_size, args.batches, seed=0))

        decode_s = best_of(lambda: load_tensors(pool), args.repeats)
        cache = load_tensors(pool)

        def cached() -> None:
            for idx in batches:
                t = torch.from_numpy(idx)
                augment_batch(cache.images[t], cache.masks[t], cache.labels[t], transform)

        def decode_every_batch() -> None:
            for idx in batches:
                items = next(iter(DataLoader(torch.utils.data.Subset(pool, idx.tolist()), batch_size=len(idx))))
                images = (items["image"] * 255).round().to(torch.uint8)
                masks = items["mask"].to(torch.uint8)
                augment_batch(images, masks, torch.as_tensor(items["label"]), transform)

        peer_s = best_of(decode_every_batch, args.repeats)
        ours_s = best_of(cached, args.repeats)

        step_s = {}
        for task in ("cls", "seg"):
            model = build_model(task, "resnet18").train()
            opt = torch.optim.AdamW(_param_groups(model, 1e-4, 10.0))

            def steps(model=model, opt=opt) -> None:
                for idx in batches[:3]:
                    t = torch.from_numpy(idx)
                    images, masks, lab = augment_batch(cache.images[t], cache.masks[t], cache.labels[t], transform)
                    loss = model.loss(model(normalize(images)), lab, masks)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()

            step_s[task] = best_of(steps, args.repeats) / 3

    n = len(labels)
    per = 1000 / args.batches
    print(
        f"pcb_synth high-shot train subset: {n} images ({sum(labels)} anomalous), {args.disk_size} px JPEG on "
        f"disk, trained at {args.size} px, batch {args.batch_size}, {args.batches} batches, best of {args.repeats}\n"
    )
    print("| run | ms per batch | ratio to peer |")
    print("|---|---:|---:|")
    print(f"| decode every batch (peer) | {peer_s * per:.1f} | 1.00 |")
    print(f"| in-memory uint8 cache (spotdiff) | {ours_s * per:.1f} | {ours_s / peer_s:.2f} |")
    print(
        f"\none-off decode of the {n} images into the cache: {decode_s * 1000:.0f} ms "
        f"({decode_s / n * 1000:.1f} ms per image)\n"
    )
    print("| training step, resnet18 | ms per step | ratio to classifier |")
    print("|---|---:|---:|")
    print(f"| classifier (cls) | {step_s['cls'] * 1000:.0f} | 1.00 |")
    print(f"| U-Net (seg) | {step_s['seg'] * 1000:.0f} | {step_s['seg'] / step_s['cls']:.2f} |")


if __name__ == "__main__":
    main()
