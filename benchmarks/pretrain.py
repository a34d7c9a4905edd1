"""Overhead of the pre-training loop over a bare training loop, measured in one process.

Both loops train the same method (SimSiam + SPD, resnet18, 64 px views, batch 16) on the same
generated images with the same DataLoader settings; the bare loop does only forward, backward and
the optimizer step. ``run_pretrain`` adds per-step seeding, the finite-loss check, CSV logging,
the progress bar; its fixed costs (set-up, final checkpoint, backbone export) are reported
apart. The ratio of images/s over the steps is the number reported (1.0 = no overhead).

    PYTHONPATH=src python benchmarks/pretrain.py [--steps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from spotdiff.pretrain import train
from spotdiff.pretrain.config import load_config
from spotdiff.pretrain.data import EpochBatchSampler, PretrainImages, find_images
from spotdiff.progress import set_quiet


def make_images(folder: Path, n: int, size: int = 128) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def bare_loop(data: Path, steps: int, batch: int, size: int, method_name: str) -> tuple[float, float]:
    """``(images/s over steps 2.. (wall), CPU seconds of the whole run)``: forward + backward + SGD step."""
    cpu_start = time.process_time()
    torch.manual_seed(0)
    method = train.build_method(method_name, arch="resnet18", spd=True)
    paths, labels, _ = find_images(data)
    sampler = EpochBatchSampler(len(paths), batch, seed=0)
    loader = DataLoader(
        PretrainImages(paths, labels, method.view_transform(size), 0),
        batch_size=batch,
        sampler=sampler,
        num_workers=0,
        drop_last=True,
    )
    opt = torch.optim.SGD(method.parameters(), lr=1e-3, momentum=0.9)
    done, start = 0, None
    epoch = 0
    while done < steps + 1:
        sampler.set_epoch(epoch)
        for views, _ in loader:
            if done == 1:  # the first step warms up
                start = time.perf_counter()
            out = method(views, generator=torch.Generator().manual_seed(done))
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            method.after_step()
            done += 1
            if done == steps + 1:
                break
        epoch += 1
    return steps * batch / (time.perf_counter() - start), time.process_time() - cpu_start


def spotdiff_loop(
    data: Path, out: Path, steps: int, batch: int, size: int, method_name: str
) -> tuple[float, float, float]:
    """``(images/s over steps 2.. (wall), wall seconds outside the steps, CPU seconds of the whole run)``.

    Per-step times come from the CSV log (one row per step); the rest of the wall time is
    set-up (model, data listing), the final checkpoint and the backbone export.
    """
    cfg = load_config(
        None,
        dict(
            method=method_name,
            spd=True,
            arch="resnet18",
            data=str(data),
            out=str(out),
            steps=steps + 1,
            batch_size=batch,
            image_size=size,
            workers=0,
            log_every=1,
            tensorboard=False,
            checkpoint_every=0,
        ),
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    train.run_pretrain(cfg)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    step_s = [batch / float(row.split(",")[-1]) for row in (out / "log.csv").read_text().splitlines()[1:]]
    return steps * batch / sum(step_s[1:]), total - sum(step_s), cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=96)  # SmoothBlend holds its defaults from 91 px
    parser.add_argument("--method", default="simsiam")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    set_quiet(True)
    tmp = Path(tempfile.mkdtemp())
    bare, ours, fixed, bare_cpu, ours_cpu = [], [], [], [], []
    try:
        make_images(tmp / "images", 64)
        for r in range(args.rounds):  # interleaved, so machine-load drift hits both alike
            speed, cpu = bare_loop(tmp / "images", args.steps, args.batch, args.size, args.method)
            bare.append(speed)
            bare_cpu.append(cpu)
            speed, outside, cpu = spotdiff_loop(
                tmp / "images", tmp / f"run{r}", args.steps, args.batch, args.size, args.method
            )
            ours.append(speed)
            fixed.append(outside)
            ours_cpu.append(cpu)
    finally:
        shutil.rmtree(tmp)
    ratios = sorted(o / b for o, b in zip(ours, bare, strict=True))
    cpu_ratios = sorted(b / o for o, b in zip(ours_cpu, bare_cpu, strict=True))
    med = statistics.median
    print(
        f"{args.method}+spd resnet18 {args.size}px batch {args.batch}, {args.steps + 1} steps x {args.rounds} "
        "rounds, 1 thread, workers=0"
    )
    print(f"bare loop:     median {med(bare):8.2f} img/s (wall, steps 2..), {med(bare_cpu):.1f} CPU s per run")
    print(
        f"run_pretrain:  median {med(ours):8.2f} img/s (wall, steps 2..), {med(ours_cpu):.1f} CPU s per run; "
        f"{med(fixed):.1f} s wall outside the steps (set-up, final checkpoint, export)"
    )
    print(
        f"speed ratio run_pretrain / bare, steps only (wall): median {med(ratios):.3f} "
        f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f})"
    )
    print(
        f"speed ratio run_pretrain / bare, whole run (CPU time): median {med(cpu_ratios):.3f} "
        f"(min {cpu_ratios[0]:.3f}, max {cpu_ratios[-1]:.3f})"
    )


if __name__ == "__main__":
    main()
