"""Cost of SPD: training-step time of each base method with and without SPD, and SmoothBlend throughput.

Ratios are measured against a peer run in the same process (base method vs base + SPD, batched
SmoothBlend vs a per-sample loop), so they are comparable across machines. Steps of the two variants
are interleaved and the median is reported, which keeps the ratios stable on a busy machine.

CPU figure (default, a few minutes on 2 cores)::

    PYTHONPATH=src python benchmarks/pretrain_bench.py

GPU figure (ResNet-50, batch 256 per step, 224 px, AMP)::

    PYTHONPATH=src python benchmarks/pretrain_bench.py --device cuda --arch resnet50 \\
        --batch 256 --size 224 --amp --steps 20 --out benchmarks/results_pretrain_gpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from spotdiff.augment import SmoothBlend
from spotdiff.files import write_text_atomic
from spotdiff.pretrain import METHODS, PretrainMethod, build_method

# Cost of one image through backbone + head, in forward-pass units (a backward pass ~ 2 forwards).
FWD, FWD_BWD = 1.0, 3.0


def expected_ratio(name: str) -> float:
    """Step-time ratio (base + SPD) / base predicted from the forward/backward passes per image."""
    base = {
        "simsiam": 2 * FWD_BWD,  # two views with gradient
        "simclr": 2 * FWD_BWD,
        "moco": FWD_BWD + FWD,  # query view with gradient, key view forward only
        "supervised": FWD_BWD,
    }[name]
    return (base + 2 * FWD_BWD) / base  # SPD: positive + negative, both with gradient


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(
    method: PretrainMethod, views: dict, labels: torch.Tensor, device: torch.device, amp: bool
) -> Callable[[int], None]:
    opt = torch.optim.SGD(method.param_groups(0.01), lr=0.01, momentum=0.9)

    def step(seed: int) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16, enabled=amp):
            out = method(views, labels=labels, generator=gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        method.after_step()

    return step


def bench_methods(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name in METHODS:
        extra = {"num_classes": 10} if name == "supervised" else {}
        torch.manual_seed(0)
        base = build_method(name, arch=args.arch, spd=False, **extra).to(device)
        torch.manual_seed(0)
        spd = build_method(name, arch=args.arch, spd=True, **extra).to(device)
        views = {
            v: torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device) for v in spd.required_views()
        }
        labels = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
        steps = {
            "base": _step_fn(base, views, labels, device, args.amp),
            "spd": _step_fn(spd, views, labels, device, args.amp),
        }
        times: dict[str, list[float]] = {"base": [], "spd": []}
        for i in range(args.warmup + args.steps):
            for key, step in steps.items():
                _sync(device)
                t0 = time.perf_counter()
                step(i)
                _sync(device)
                if i >= args.warmup:
                    times[key].append(time.perf_counter() - t0)
        t_base, t_spd = statistics.median(times["base"]), statistics.median(times["spd"])
        # median of the ratios of adjacent (base, SPD) steps: robust to load drifting on a shared machine
        ratio = statistics.median(s / b for b, s in zip(times["base"], times["spd"]))
        rows.append(
            {"method": name, "base_s": t_base, "spd_s": t_spd, "ratio": ratio, "expected": expected_ratio(name)}
        )
        print(
            f"{name:10s} base {t_base * 1e3:8.1f} ms  +SPD {t_spd * 1e3:8.1f} ms  "
            f"ratio {ratio:.2f} (expected {expected_ratio(name):.2f})",
            flush=True,
        )
        del base, spd, views
    return rows


def bench_smoothblend(args: argparse.Namespace, device: torch.device) -> dict:
    """Images per second of SmoothBlend at 224 x 224: batched vs a per-sample loop (same module)."""
    blend = SmoothBlend().to(device)
    images = torch.rand(args.blend_batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)

    def batched() -> None:
        blend(images, generator=torch.Generator(device=device).manual_seed(0))

    def per_sample() -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        for i in range(images.shape[0]):
            blend(images[i : i + 1], generator=gen)

    def timed(fn: Callable[[], None]) -> float:
        fn()
        samples = []
        for _ in range(args.blend_repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples.append(time.perf_counter() - t0)
        return images.shape[0] / statistics.median(samples)

    result = {"batched": timed(batched), "per_sample": timed(per_sample)}
    # Reference: copying the batch once (clone), the floor for any out-of-place augmentation.
    result["clone"] = timed(lambda: images.clone())
    print(
        f"SmoothBlend 224x224: batched {result['batched']:.0f} img/s, per-sample loop "
        f"{result['per_sample']:.0f} img/s, clone {result['clone']:.0f} img/s",
        flush=True,
    )
    return result


def render(args: argparse.Namespace, device: torch.device, rows: list[dict], blend: dict, elapsed: float) -> str:
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{os.cpu_count()}-core {platform.machine()} CPU, torch.set_num_threads({torch.get_num_threads()})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = " ".join(["PYTHONPATH=src python benchmarks/pretrain_bench.py", *args.argv])
    lines = [
        "# Pre-training methods: cost of SPD and SmoothBlend throughput",
        "",
        f"Date 2026-11-25; {machine}; Python {platform.python_version()}, torch {torch.__version__}.",
        f"Command: `{command}` ({elapsed:.0f} s; 1-minute load average {load:.1f} at the end: absolute "
        "times on a shared machine are inflated, the same-process ratios are the figures to compare).",
        "",
        f"## Training step, {args.arch}, batch {args.batch}, {args.size} px{', AMP' if args.amp else ''}, "
        f"{args.steps} interleaved step pairs",
        "",
        "Paper-default heads (SimSiam 2048/512, MoCo v2 128-d with a 65536 queue, SimCLR 128-d). "
        "`expected` is the ratio predicted from the passes per image (forward = 1, forward + backward = 3): "
        "SPD adds one forward + backward of 2B images (positive and blended negative). Step times are "
        "medians; `ratio` is the median of the ratios of adjacent (base, SPD) steps.",
        "",
        "| method | base step (ms) | + SPD step (ms) | ratio | expected |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['base_s'] * 1e3:.1f} | {r['spd_s'] * 1e3:.1f} | "
            f"{r['ratio']:.2f} | {r['expected']:.2f} |"
        )
    lines += [
        "",
        f"## SmoothBlend, 224 x 224, batch {args.blend_batch}, one thread",
        "",
        "| variant | images / s | relative to batched |",
        "|---|---:|---:|",
    ]
    for key, label in (
        ("batched", "batched (one call per batch)"),
        ("per_sample", "per-sample loop (one call per image)"),
        ("clone", "reference: `images.clone()`"),
    ):
        lines.append(f"| {label} | {blend[key]:.0f} | {blend[key] / blend['batched']:.2f} |")
    if device.type == "cpu":
        lines += [
            "",
            "GPU figure (not measured in this session, no GPU available):",
            "`PYTHONPATH=src python benchmarks/pretrain_bench.py --device cuda --arch resnet50 --batch 256 "
            "--size 224 --amp --steps 20 --out benchmarks/results_pretrain_gpu.md`.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import sys

    raw = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=96)  # SmoothBlend holds its defaults from 91 px
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the SmoothBlend figure is per core)")
    p.add_argument("--blend-batch", type=int, default=64)
    p.add_argument("--blend-repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results_pretrain.md")
    args = p.parse_args(raw)
    args.argv = raw
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    rows = bench_methods(args, device)
    blend = bench_smoothblend(args, device)
    text = render(args, device, rows, blend, time.perf_counter() - start)
    write_text_atomic(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
