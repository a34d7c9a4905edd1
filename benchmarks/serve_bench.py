"""Load test of `spotdiff serve` on loopback: throughput, latency, 503 share and errors at several
concurrencies, against the in-process model throughput on the same images in the same run.

Fits a random-init ResNet-18 PaDiM on synthetic 256-px images (speed does not depend on the
weights' values) unless ``--model-dir`` is given, starts ``spotdiff serve`` as a subprocess on
127.0.0.1, and drives it with an async httpx client: for each concurrency, at most ``--requests``
requests and at most ``--seconds`` seconds. The in-process figure (decode + score on the service's
path, ``spotdiff.serve.scoring.prepare_request`` then ``ImageScorer.score_batch``, in batches of
``--max-batch``, and ``Detector.predict`` alone on decoded tensors) is measured before and after
the load runs, with the same thread count, and the mean is the reference. ``--overload-queue Q``
adds a run at the highest concurrency against a server whose queue holds only Q images, to show
the 503 + Retry-After path.

Nothing leaves loopback. The client shares the machine's cores with the server: on a 2-core
machine its CPU time is part of what the service figure pays.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/serve_bench.py [--concurrency 1 8 32] [--requests 300]
        [--seconds 60] [--threads 2] [--max-batch 8] [--max-wait-ms 5] [--overload-queue 8]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from spotdiff.detect import PaDiM
from spotdiff.detect.calibration import calibrate
from spotdiff.serve import load_models
from spotdiff.serve.scoring import ServedModel, prepare_request

ROOT = Path(__file__).resolve().parents[1]


def synthetic(n: int, size: int, seed: int) -> torch.Tensor:
    """``(n, 3, size, size)`` textured grey images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(
        torch.rand(n, 3, size // 16, size // 16, generator=g), size=(size, size), mode="bilinear", align_corners=False
    )
    return (0.3 + 0.4 * base + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def png_bytes(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def fit_model(out: Path, size: int) -> Path:
    model = PaDiM(arch="resnet18").fit([{"image": x} for x in synthetic(32, size, seed=0)])
    calibrate(model, [{"image": x} for x in synthetic(8, size, seed=2)])
    model.save(out)
    return out


def in_process(model: ServedModel, images: list[bytes], batch: int, rounds: int = 2) -> dict[str, float]:
    """Images/s of decode + score (the service's path, no HTTP) and of ``predict`` alone."""
    full, bare, cpu = [], [], []
    tensors = torch.from_numpy(np.stack([prepare_request(model, d, 10**9)[0].pixels for d in images]))
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        for start in range(0, len(images), batch):
            model.scorer.score_batch([prepare_request(model, d, 10**9)[0] for d in images[start : start + batch]])
        full.append(len(images) / (time.perf_counter() - t0))
        cpu.append((time.process_time() - c0) / len(images))
        t0 = time.perf_counter()
        for start in range(0, len(images), batch):
            model.scorer.model.predict(tensors[start : start + batch])
        bare.append(len(images) / (time.perf_counter() - t0))
    return {
        "decode_score": statistics.median(full),
        "predict": statistics.median(bare),
        "cpu_per_image": statistics.median(cpu),
    }


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model_dir: Path, args: argparse.Namespace, tmp: Path, max_queue: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("SPOTDIFF_API_KEYS", None)
    cmd = [
        sys.executable,
        "-m",
        "spotdiff",
        "--quiet",
        "--threads",
        str(args.threads),
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--audit-log",
        str(tmp / "audit.jsonl"),
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--max-queue",
        str(max_queue),
    ]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not ready within 120 s")


async def drive(port: int, images: list[bytes], concurrency: int, requests: int, seconds: float) -> dict[str, float]:
    """``concurrency`` clients post images until ``requests`` were sent or ``seconds`` passed."""
    url = f"http://127.0.0.1:{port}/v1/models/padim/predict"
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    sent = 0
    stop_at = time.perf_counter() + seconds

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < stop_at:
            data = images[sent % len(images)]
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await session.post(url, content=data, headers={"Content-Type": "image/png"})
                key = str(r.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            if key == "200":
                latencies.append(time.perf_counter() - t0)
            elif key == "503":
                await asyncio.sleep(0.05)  # a polite client backs off a little (Retry-After says 1 s)
            statuses[key] = statuses.get(key, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = statuses.get("200", 0)
    total = sum(statuses.values())
    lat = np.array(latencies) * 1000.0
    return {
        "concurrency": concurrency,
        "sent": total,
        "ok": ok,
        "wall": wall,
        "rate": ok / wall,
        "p50": float(np.percentile(lat, 50)) if ok else float("nan"),
        "p99": float(np.percentile(lat, 99)) if ok else float("nan"),
        "share_503": statuses.get("503", 0) / max(total, 1),
        "errors": total - ok - statuses.get("503", 0),
        "statuses": statuses,
    }


def run_levels(
    model_dir: Path, args: argparse.Namespace, tmp: Path, images: list[bytes], levels: list[int], max_queue: int
) -> list[dict]:
    """Each level bracketed by in-process passes over the same images (the machine's load drifts)."""
    model = load_models([str(model_dir)])[0]
    proc, port = start_server(model_dir, args, tmp, max_queue)
    try:
        asyncio.run(drive(port, images, 2, min(16, args.requests), 30))  # warm-up
        out = []
        for c in levels:
            before = in_process(model, images, args.max_batch)
            server0, client0 = process_cpu(proc.pid), time.process_time()
            result = asyncio.run(drive(port, images, c, args.requests, args.seconds))
            result["server_cpu"] = (process_cpu(proc.pid) - server0) / max(result["ok"], 1)
            result["client_cpu"] = (time.process_time() - client0) / max(result["sent"], 1)
            after = in_process(model, images, args.max_batch)
            out.append(
                {
                    **result,
                    "queue": max_queue,
                    "in_process": {k: (before[k] + after[k]) / 2 for k in before},
                    "in_process_range": {k: (min(before[k], after[k]), max(before[k], after[k])) for k in before},
                }
            )
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="a calibrated model (default: fit a random-init one)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--images", type=int, default=32, help="distinct images sent round-robin")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=300, help="most requests per concurrency level")
    p.add_argument("--seconds", type=float, default=60.0, help="most seconds per concurrency level")
    p.add_argument("--threads", type=int, default=1, help="torch threads, server and in process (default 1)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--overload-queue", type=int, default=0, help="also run the top concurrency with this queue size")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started, load0 = datetime.now(UTC), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = args.model_dir or fit_model(tmp / "padim", args.image_size)
        images = [png_bytes(x) for x in synthetic(args.images, args.image_size, seed=5)]
        results = run_levels(model_dir, args, tmp, images, args.concurrency, args.max_queue)
        if args.overload_queue:
            results += run_levels(model_dir, args, tmp, images, [max(args.concurrency)], args.overload_queue)
    load1 = os.getloadavg()
    print(f"### serve_bench.py, {started:%Y-%m-%d %H:%M} UTC\n")
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}; "
        f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end (1 min). Random-init ResNet-18 PaDiM, "
        f"{args.image_size} px PNG bodies, {args.threads} torch thread(s) in the server and in process, max batch "
        f"{args.max_batch}, max wait {args.max_wait_ms:g} ms; at most {args.requests} requests / {args.seconds:g} s "
        f"per level. In process = decode + score with the service's adapter in batches of {args.max_batch}, "
        f"measured right before and after each level (mean, range in brackets).\n"
    )
    print(
        "| concurrency | queue | requests | service images/s | in-process images/s | ratio | ÷ predict alone "
        "| p50 ms | p99 ms | 503 share | errors | CPU ms per image: server / in process / client per request |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        ref, span = r["in_process"], r["in_process_range"]["decode_score"]
        print(
            f"| {r['concurrency']} | {r['queue']} | {r['sent']} | {r['rate']:.1f} | {ref['decode_score']:.1f} "
            f"({span[0]:.1f}–{span[1]:.1f}) | {r['rate'] / ref['decode_score']:.2f} | {r['rate'] / ref['predict']:.2f} "
            f"| {r['p50']:.0f} | {r['p99']:.0f} | {100 * r['share_503']:.1f} % | {r['errors']} "
            f"| {1000 * r['server_cpu']:.0f} / {1000 * ref['cpu_per_image']:.0f} / {1000 * r['client_cpu']:.1f} |"
        )


if __name__ == "__main__":
    main()
