"""GPU readiness check: every GPU path of spotdiff once, on one GPU, in a few minutes; one markdown file.

Checks (each guarded: a failing check is recorded with its error and the others still run):

1. ``smoothblend_parity``  -- SmoothBlend on the device equals SmoothBlend on the CPU (same seed).
2. ``pretrain_throughput`` -- images/s of the pre-training loop's own step (``train.train_step``:
   forward under autocast, backward, optimizer, after_step) for SimSiam and SimSiam + SPD on
   synthetic batches already in device memory (no data loading), after warm-up steps.
3. ``torchrun_smoke``      -- ``torchrun --nproc-per-node 1 -m spotdiff pretrain`` on tiny images:
   a process group (NCCL on GPU, gloo on CPU), SyncBatchNorm, DDP, checkpoint, exported backbone.
4. ``detector_parity``     -- PaDiM and PatchCore fitted and run on the device (``forward_batch``
   images per pass) and on the CPU (4 per pass): same scores and maps within tolerance.
5. ``unet_amp_step``       -- U-Net (``finetune/unet.py``) training steps under bf16 / fp16 autocast:
   finite loss and gradients, loss close to fp32, time per step.

Run on a GPU machine (about 2-4 minutes on one data-centre GPU; under 8 minutes by design)::

    benchmarks/gpu_check.sh                      # writes benchmarks/gpu_check_<UTC time>.md
    benchmarks/gpu_check.sh --out gpu.md --device cuda:1

``--device cpu --tiny`` runs every code path with tiny sizes (gloo instead of NCCL) in seconds; the
test suite runs it so the script cannot rot while no GPU is at hand. Exit status: 0 when every
check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from spotdiff import __version__  # noqa: E402
from spotdiff.files import write_text_atomic  # noqa: E402
from spotdiff.progress import set_quiet  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one mode (``FULL`` on a GPU, ``TINY`` for the CPU smoke run)."""

    pretrain_arch: str
    pretrain_batch: int
    pretrain_px: int
    warmup_steps: int
    timed_steps: int
    blend_batch: int
    blend_px: int
    detect_train: int
    detect_test: int
    detect_px: int
    padim_arch: str
    patchcore_arch: str
    unet_arch: str
    unet_batch: int
    unet_px: int
    unet_steps: int
    smoke_images: int
    smoke_px: int
    smoke_steps: int
    smoke_batch: int


FULL = Sizes(
    "resnet50",
    256,
    224,
    5,
    20,
    256,
    224,
    32,
    8,
    256,
    "resnet18",
    "wide_resnet50_2",
    "resnet50",
    8,
    256,
    3,
    32,
    64,
    3,
    8,
)
TINY = Sizes("resnet18", 4, 32, 1, 2, 4, 32, 6, 2, 32, "resnet18", "resnet18", "resnet18", 2, 32, 2, 8, 32, 2, 4)


def blend_settings(px: int) -> dict[str, tuple[float, float]]:
    """SmoothBlend's ``area`` / ``aspect`` for ``px``-pixel images: the defaults from 91 px, below that
    settings that hold their stated area and smoothness there (docs/pretrain_methods.md)."""
    return {} if px >= 91 else {"area": (0.04, 0.08), "aspect": (0.5, 2.0)}


# Tolerances (our choice): SmoothBlend is elementwise float32 maths, so only erf/exp rounding differs;
# detector outputs go through convolutions, a Cholesky inverse (PaDiM) or a greedy coreset (PatchCore).
BLEND_TOL = 1e-5  # max |device - cpu| on ImageNet-normalised pixels
DETECT_TOL = 1e-3  # max |device - cpu| / max |cpu| of scores and of maps (TF32 off during the check)
AMP_LOSS_TOL = 0.05  # |loss_amp - loss_fp32| / loss_fp32 at the same weights and batch


class CheckFailed(AssertionError):
    """A check ran but its result is out of tolerance; ``report`` keeps what it measured."""

    def __init__(self, message: str, report: Report | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Report:
    """One check's outcome: a one-line summary, detail lines (markdown) and the time it took."""

    name: str
    ok: bool = False
    summary: str = ""
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _within(report: Report, what: str, diffs: list[float], tolerance: float) -> Report:
    """Set the summary from the largest of ``diffs``; CheckFailed when it exceeds ``tolerance`` or one is NaN."""
    worst = math.nan if any(math.isnan(d) for d in diffs) else max(diffs)
    report.summary = f"{what} {worst:.1e} (tolerance {tolerance:g})"
    if not worst <= tolerance:
        raise CheckFailed(report.summary, report)
    return report


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"


def _smooth_images(n: int, px: int, seed: int) -> torch.Tensor:
    """``(n, 3, px, px)`` images in [0, 1]: low-frequency colour blobs plus fine noise (CPU)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(px, px), mode="bicubic", align_corners=False)
    return (images + 0.05 * torch.randn(n, 3, px, px, generator=g)).clamp(0, 1)


# ----------------------------------------------------------------------------------------- checks
def check_smoothblend_parity(device: torch.device, sizes: Sizes, work: Path) -> Report:
    from spotdiff.augment.smoothblend import SmoothBlend
    from spotdiff.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

    report = Report("smoothblend_parity")
    blend = SmoothBlend(mean=IMAGENET_MEAN, std=IMAGENET_STD, **blend_settings(sizes.blend_px))
    images = normalize(_smooth_images(sizes.blend_batch, sizes.blend_px, seed=1))
    ref, ref_alpha = blend(images, generator=torch.Generator().manual_seed(7), return_mask=True)
    dev_blend = blend.to(device)
    rows, diffs = [], []
    for layout in ("contiguous", "channels_last"):
        x = images.to(device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        out, alpha = dev_blend(x, generator=torch.Generator().manual_seed(7), return_mask=True)
        diff = float((out.cpu() - ref).abs().max())
        alpha_diff = float((alpha.cpu() - ref_alpha).abs().max())
        changed = int((ref != images).flatten(1).any(1).sum())
        diffs += [diff, alpha_diff]
        rows.append(f"| {layout} | {diff:.2e} | {alpha_diff:.2e} | {changed}/{len(images)} |")
    _sync(device)
    report.details = [
        f"{sizes.blend_batch} images of {sizes.blend_px} px, ImageNet-normalised, one CPU "
        f"generator seed for both; tolerance {BLEND_TOL:g}.",
        "",
        "| layout on device | max abs diff (image) | max abs diff (alpha) | images changed |",
        "|---|---:|---:|---:|",
        *rows,
    ]
    return _within(report, "max abs diff", diffs, BLEND_TOL)


def check_pretrain_throughput(device: torch.device, sizes: Sizes, work: Path) -> Report:
    from spotdiff.pretrain.distributed import DistContext

    report = Report("pretrain_throughput")
    on_gpu = device.type == "cuda"
    amp = torch.bfloat16 if on_gpu else None  # as the loop: autocast on GPU only
    ctx = DistContext(rank=0, world_size=1, local_rank=device.index or 0, device=device)
    rows, rates, failures = [], {}, []
    for spd in (False, True):
        name = "SimSiam + SPD" if spd else "SimSiam"
        try:
            rate, row = _throughput(name, spd, device, sizes, amp, ctx)
        except (torch.cuda.OutOfMemoryError, CheckFailed) as exc:  # the other method is still measured
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            rows.append(
                f"| {name} | {sizes.pretrain_arch} | {sizes.pretrain_batch} | {sizes.pretrain_px} | "
                f"{'bf16' if amp else 'fp32'} | {sizes.warmup_steps} | {sizes.timed_steps} | failed | | | "
                f"{_peak_gib(device)} |"
            )
        else:
            rates[name] = rate
            rows.append(row)
        if on_gpu:
            torch.cuda.empty_cache()
    ratio = rates["SimSiam + SPD"] / rates["SimSiam"] if len(rates) == 2 else math.nan
    report.details = [
        "Images/s = batch x timed steps / wall time of the timed steps (the loop's `img_per_s`): "
        "one image = one sample, whatever its number of views. Synthetic batches in device "
        "memory, so no data loading; SGD per the SimSiam recipe; the loop's `train_step`.",
        "",
        "| method | arch | batch | px | AMP | warm-up steps | timed steps | images/s | s/step | last loss | peak GiB |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"SPD / plain throughput: {ratio:.2f}.",
        *(f"- {f}" for f in failures),
    ]
    report.summary = (
        ", ".join(f"{n} {r:.1f} img/s" for n, r in rates.items())
        + f" ({sizes.pretrain_arch}, batch {sizes.pretrain_batch}, {'bf16' if amp else 'fp32'})"
    )
    if failures:
        raise CheckFailed("; ".join(failures), report)
    return report


def _throughput(
    name: str, spd: bool, device: torch.device, sizes: Sizes, amp: torch.dtype | None, ctx: object
) -> tuple[float, str]:
    """Images/s of the loop's ``train_step`` for SimSiam (+ SPD), and its markdown table row."""
    from spotdiff.pretrain.methods import build_method
    from spotdiff.pretrain.optim import build_optimizer, remember_peak_lr
    from spotdiff.pretrain.train import train_step

    on_gpu = device.type == "cuda"
    torch.manual_seed(0)
    blend = {f"blend_{k}": v for k, v in blend_settings(sizes.pretrain_px).items()} if spd else {}
    method = build_method("simsiam", arch=sizes.pretrain_arch, spd=spd, **blend).to(device)
    if on_gpu:
        method.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = build_optimizer(method, method.recipe.base_lr * sizes.pretrain_batch / 256)
    remember_peak_lr(optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling
    g = torch.Generator(device).manual_seed(0)
    layout = torch.channels_last if on_gpu else torch.contiguous_format
    views = {
        k: torch.randn(
            sizes.pretrain_batch, 3, sizes.pretrain_px, sizes.pretrain_px, device=device, generator=g
        ).contiguous(memory_format=layout)
        for k in method.required_views()
    }
    labels = torch.zeros(sizes.pretrain_batch, dtype=torch.long, device=device)
    for _ in range(sizes.warmup_steps):
        train_step(method, method, optimizer, scaler, views, labels, g, amp, ctx)
    _sync(device)
    start = time.perf_counter()
    for _ in range(sizes.timed_steps):
        stats = train_step(method, method, optimizer, scaler, views, labels, g, amp, ctx)
    _sync(device)
    elapsed = time.perf_counter() - start
    if not all(math.isfinite(v) for v in stats):
        raise CheckFailed(f"loss not finite ({stats})")
    rate = sizes.pretrain_batch * sizes.timed_steps / elapsed
    return rate, (
        f"| {name} | {sizes.pretrain_arch} | {sizes.pretrain_batch} | {sizes.pretrain_px} | "
        f"{'bf16' if amp else 'fp32'} | {sizes.warmup_steps} | {sizes.timed_steps} | {rate:.1f} | "
        f"{elapsed / sizes.timed_steps:.3f} | {stats[0]:.4f} | {_peak_gib(device)} |"
    )


def _write_images(folder: Path, n: int, px: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = (_smooth_images(n, px, seed=3) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, array in enumerate(images):
        Image.fromarray(array).save(folder / f"img_{i:03d}.png")
    return folder


def check_torchrun_smoke(device: torch.device, sizes: Sizes, work: Path) -> Report:
    report = Report("torchrun_smoke")
    images = _write_images(work / "smoke_images", sizes.smoke_images, sizes.smoke_px)
    run = work / "smoke_run"
    shutil.rmtree(run, ignore_errors=True)  # our scratch folder: a fresh run each time
    backend = "nccl" if device.type == "cuda" else "gloo"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "spotdiff",
        "pretrain",
        "--method",
        "simsiam",
        "--spd",
        "--arch",
        "resnet18",
        "--data",
        str(images),
        "--out",
        str(run),
        "--steps",
        str(sizes.smoke_steps),
        "--batch-size",
        str(sizes.smoke_batch),
        "--image-size",
        str(sizes.smoke_px),
        "--workers",
        "0",
        "--amp",
        "bf16",
        "--checkpoint-every",
        "0",
        "--set",
        f"device={device.type}",
        "--set",
        "log_every=1",
        "--set",
        "tensorboard=false",
        *[a for k, v in blend_settings(sizes.smoke_px).items() for a in ("--set", f"hparams.blend_{k}={list(v)}")],
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
    if device.type == "cuda":  # LOCAL_RANK 0 is then this check's GPU
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        index = torch.cuda.current_device() if device.index is None else device.index
        env["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    if done.returncode != 0:
        raise CheckFailed(f"exit status {done.returncode}: {' / '.join(tail)}")
    marker = f"on 1 process(es) ({device.type}, {backend})"
    if marker not in done.stderr:
        raise CheckFailed(f"the run did not report a {backend} process group ({marker!r} not in its log)")
    rows = [ln.split(",") for ln in (run / "log.csv").read_text().splitlines()[1:]]
    losses = [float(r[3]) for r in rows]
    if len(rows) != sizes.smoke_steps or not all(math.isfinite(v) for v in losses):
        raise CheckFailed(f"log.csv: {len(rows)} rows for {sizes.smoke_steps} steps, losses {losses}")
    missing = [n for n in ("checkpoint.pt", "backbone.safetensors") if not (run / n).is_file()]
    if missing:
        raise CheckFailed(f"missing outputs: {missing}")
    report.details = [
        f"`torchrun --standalone --nproc-per-node 1 -m spotdiff pretrain --method simsiam --spd "
        f"--arch resnet18` on {sizes.smoke_images} images of {sizes.smoke_px} px, "
        f"{sizes.smoke_steps} steps of {sizes.smoke_batch}, AMP bf16 (GPU only); {seconds:.1f} s "
        "with start-up.",
        "",
        f"- process group: {backend} (log: `{marker}`); SyncBatchNorm and DDP on GPU",
        f"- losses per step: {', '.join(f'{v:.4f}' for v in losses)}",
        "- checkpoint.pt and backbone.safetensors written",
    ]
    report.summary = f"{backend} process group, {sizes.smoke_steps} steps, finite losses, outputs written"
    return report


def check_detector_parity(device: torch.device, sizes: Sizes, work: Path) -> Report:
    from spotdiff.detect import PaDiM, PatchCore

    report = Report("detector_parity")
    images = _smooth_images(sizes.detect_train + sizes.detect_test, sizes.detect_px, seed=5)
    train, test = list(images[: sizes.detect_train]), images[sizes.detect_train :]
    rows, diffs = [], []
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for cls, kwargs in (
            (PaDiM, {"arch": sizes.padim_arch}),
            (PatchCore, {"arch": sizes.patchcore_arch, "coreset_ratio": 1.0}),
        ):
            outputs = []
            for dev in (torch.device("cpu"), device):
                model = cls(seed=0, batch_size=32, device=dev, **kwargs).fit(train)
                outputs.append((model.forward_batch, *model.predict(test)))
            (cpu_batch, cpu_s, cpu_m), (dev_batch, dev_s, dev_m) = outputs
            s_diff = float((dev_s - cpu_s).abs().max() / cpu_s.abs().max().clamp_min(1e-12))
            m_diff = float((dev_m - cpu_m).abs().max() / cpu_m.abs().max().clamp_min(1e-12))
            diffs += [s_diff, m_diff]
            rows.append(
                f"| {cls.__name__} | {kwargs['arch']} | {dev_batch} / {cpu_batch} | {s_diff:.1e} | {m_diff:.1e} |"
            )
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    report.details = [
        f"Fitted on {sizes.detect_train} and run on {sizes.detect_test} synthetic images of "
        f"{sizes.detect_px} px, seed 0, on the device and on the CPU; TF32 off during the check "
        "(so only the batching and kernels differ). PatchCore keeps its whole memory bank "
        "(coreset_ratio 1.0): the greedy coreset's near-ties may break differently on CUDA, which "
        f"is not what this compares. Tolerance {DETECT_TOL:g}, relative to the largest CPU value.",
        "",
        "| detector | arch | images per forward (device / CPU) | scores: max rel diff | maps: max rel diff |",
        "|---|---|---|---:|---:|",
        *rows,
    ]
    return _within(report, "max relative diff", diffs, DETECT_TOL)


def check_unet_amp_step(device: torch.device, sizes: Sizes, work: Path) -> Report:
    from spotdiff.data.transforms import normalize
    from spotdiff.finetune.train import build_model

    report = Report("unet_amp_step")
    torch.manual_seed(0)
    model = build_model("seg", sizes.unet_arch).to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    images = normalize(_smooth_images(sizes.unet_batch, sizes.unet_px, seed=9)).to(device)
    masks = torch.zeros(sizes.unet_batch, sizes.unet_px, sizes.unet_px, device=device)
    quarter = sizes.unet_px // 4
    masks[::2, quarter : 2 * quarter, quarter : 2 * quarter] = 1
    labels = (masks.flatten(1).amax(1) > 0).long()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [("fp32", None), ("bf16", torch.bfloat16)] + ([("fp16", torch.float16)] if device.type == "cuda" else [])
    rows, losses = [], {}
    for name, dtype in modes:
        model.load_state_dict(state)  # every mode starts from the same weights and BN statistics
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        times, overflows = [], 0
        for step in range(sizes.unet_steps):
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model.loss(model(images), labels, masks)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # no-op unless fp16 loss scaling is on
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            overflows += not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
            if step == 0:
                losses[name] = float(loss.detach())
                if not math.isfinite(losses[name]):
                    raise CheckFailed(f"{name}: loss {losses[name]}")
            scaler.step(optimizer)  # fp16: skipped when a gradient overflowed, and the scale lowered
            scaler.update()
            _sync(device)
            times.append(time.perf_counter() - start)
        if overflows and (dtype is not torch.float16 or overflows == sizes.unet_steps):
            raise CheckFailed(f"{name}: non-finite gradients in {overflows} of {sizes.unet_steps} steps")
        rel = abs(losses[name] - losses["fp32"]) / losses["fp32"]
        rows.append(f"| {name} | {losses[name]:.5f} | {rel:.1e} | {overflows} | {min(times[1:]) * 1000:.1f} |")
        if rel > AMP_LOSS_TOL:
            raise CheckFailed(f"{name}: first loss {losses[name]:.5f} vs fp32 {losses['fp32']:.5f} (rel {rel:.1e})")
    report.details = [
        f"U-Net on {sizes.unet_arch}, batch {sizes.unet_batch} at {sizes.unet_px} px, focal loss, AdamW "
        "(fp16 with loss scaling; a skipped first step of the scaler is normal); "
        f"{sizes.unet_steps} steps per mode from the same weights. Note: `spotdiff finetune` itself trains in fp32 "
        "today; this checks that the U-Net is ready for autocast.",
        "",
        "| mode | first loss | rel diff to fp32 | steps with overflow | ms/step (best after the first) |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]
    report.summary = "finite loss and gradients; " + ", ".join(
        f"{n} loss within {abs(losses[n] - losses['fp32']) / losses['fp32']:.0e} of fp32" for n, _ in modes[1:]
    )
    return report


CHECKS: list[Callable[[torch.device, Sizes, Path], Report]] = [
    check_smoothblend_parity,
    check_pretrain_throughput,
    check_torchrun_smoke,
    check_detector_parity,
    check_unet_amp_step,
]


# ----------------------------------------------------------------------------------------- report
def environment(device: torch.device, tiny: bool) -> list[str]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name} ({device}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor})"
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
    else:
        gpu, nccl = "none (CPU run)", "-"
    return [
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC",
        f"- GPU: {gpu}",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda or '-'}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else '-'}, NCCL {nccl}",
        f"- spotdiff {__version__}, Python {platform.python_version()}, host {socket.gethostname()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        f"- mode: {'tiny (`--tiny`: smoke sizes; the numbers are not performance figures)' if tiny else 'full'}",
    ]


def render(head: list[str], reports: list[Report], pending: list[str]) -> str:
    passed = sum(r.ok for r in reports)
    lines = [
        "# spotdiff GPU check",
        "",
        *head,
        f"- result: {passed}/{len(reports)} checks passed" + (f", {len(pending)} not run yet" if pending else ""),
        "",
        "| check | result | seconds | summary |",
        "|---|---|---:|---|",
    ]
    lines += [f"| {r.name} | {'PASS' if r.ok else 'FAIL'} | {r.seconds:.1f} | {r.summary} |" for r in reports]
    lines += [f"| {name} | not run | | |" for name in pending]
    for r in reports:
        lines += ["", f"## {r.name}", "", *r.details]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: exercise every code path in seconds")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/gpu_check_<UTC time>.md)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new one under the system temp)")
    parser.add_argument("--only", nargs="+", metavar="CHECK", help="run only these checks")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: error: --device cuda but no CUDA device is available; use --device cpu --tiny for "
            "the CPU smoke run",
            file=sys.stderr,
        )
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = TINY if args.tiny else FULL
    set_quiet(True)  # no progress bars in the log
    out = Path(args.out or ROOT / "benchmarks" / f"gpu_check_{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.md")
    names = [c.__name__.removeprefix("check_") for c in CHECKS]
    if unknown := sorted(set(args.only or ()) - set(names)):
        print(f"gpu_check: error: unknown check(s) {unknown}; choose among {names}", file=sys.stderr)
        return 2
    checks = [c for c, n in zip(CHECKS, names) if not args.only or n in args.only]
    if args.work:
        return run_checks(device, sizes, checks, Path(args.work), out, args.tiny)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="spotdiff-gpu-check-") as work:  # removed afterwards
        return run_checks(device, sizes, checks, Path(work), out, args.tiny)


def run_checks(
    device: torch.device, sizes: Sizes, checks: list[Callable[..., Report]], work: Path, out: Path, tiny: bool
) -> int:
    """Run ``checks`` in order, rewriting the markdown ``out`` after each; 0 when all pass."""
    head = environment(device, tiny)
    reports: list[Report] = []
    for i, check in enumerate(checks):
        name = check.__name__.removeprefix("check_")
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            report = check(device, sizes, work)
            report.ok = True
        except CheckFailed as exc:
            report = exc.report or Report(name)
            report.summary = (
                report.summary if str(exc) in report.summary else "; ".join(filter(None, (report.summary, str(exc))))
            )[:400]
        except Exception as exc:  # noqa: BLE001 - one failing check must not stop the others
            report = Report(
                name,
                summary=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                details=["```", *traceback.format_exc().strip().splitlines()[-12:], "```"],
            )
        report.seconds = time.perf_counter() - start
        reports.append(report)
        print(
            f"gpu_check: {name}: {'PASS' if report.ok else 'FAIL'} ({report.seconds:.1f} s) {report.summary}",
            file=sys.stderr,
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
        pending = [c.__name__.removeprefix("check_") for c in checks[i + 1 :]]
        write_text_atomic(out, render(head, reports, pending))  # a timeout still leaves the finished checks
    print(out)
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
