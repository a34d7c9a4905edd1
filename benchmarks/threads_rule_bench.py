"""Threads that help (issue 26, item 2): 1 against 2 intra-op threads for fit, predict and export.

For each (cores this process may use, controlled background load), one child process per thread
count, interleaved (1, 2, 1, 2 ...), each timing after its imports, on the same random tensors:

* ``fit``: PaDiM ResNet-18 (random init), 256 px, d = 100, on ``--images`` images (torch threads);
* ``predict``: ``model.predict`` on the same images in batches of 8 (torch threads);
* ``export``: ``export_onnx`` (torch's trace + the ONNX checker; torch threads);
* ``ort_load``: ``OnnxDetector`` (its fingerprint / content checks and the probe run that compares the graph
  with the torch model: torch and onnxruntime threads);
* ``ort_predict``: ``OnnxDetector.predict`` on the images (onnxruntime session threads).

Cores: ``taskset -c 0`` (1 core) or all cores. Load: ``--load-cores`` busy-loop processes (pure
Python ``while True``), pinned to cores 0, 1, ..., started before and stopped after each pair; the
machine's own load average (other users) is printed beside each row. Wall seconds (best of the
rounds) and the 2-thread / 1-thread ratio.

    PYTHONPATH=src python benchmarks/threads_rule_bench.py [--images 16] [--rounds 2] [--loads 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("fit", "predict", "export", "ort_load", "ort_predict")


def prepare(work: Path, images: int) -> None:
    """A fitted, calibrated model in ``work/model`` and its ONNX export ``work/model.onnx`` (made once)."""
    import torch

    from spotdiff.detect import PaDiM
    from spotdiff.detect.calibration import calibrate
    from spotdiff.detect.export import export_onnx
    from spotdiff.progress import set_quiet

    set_quiet(True)
    data = torch.rand(images + 4, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    model = PaDiM(arch="resnet18", d=100, weights=None).fit([{"image": t} for t in data[:images]])
    calibrate(model, [{"image": t} for t in data[images:]])
    model.save(work / "model")
    export_onnx(work / "model", work / "model.onnx")


def child(threads: int, images: int, work: Path, export: bool) -> None:
    """Run the phases at ``threads`` intra-op threads (torch and onnxruntime); print their wall s as JSON."""
    import torch

    torch.set_num_threads(threads)
    from spotdiff.detect import PaDiM, load_detector
    from spotdiff.detect.export import export_onnx
    from spotdiff.detect.onnx_runtime import OnnxDetector
    from spotdiff.progress import set_quiet

    set_quiet(True)
    data = torch.rand(images + 4, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    out: dict[str, float] = {}
    start = time.perf_counter()
    PaDiM(arch="resnet18", d=100, weights=None).fit([{"image": t} for t in data[:images]])
    out["fit"] = time.perf_counter() - start
    model = load_detector(work / "model")
    start = time.perf_counter()
    for i in range(0, images, 8):
        model.predict(data[i : i + 8])
    out["predict"] = time.perf_counter() - start
    if export:
        target = work / f"export-{os.getpid()}.onnx"
        start = time.perf_counter()
        export_onnx(work / "model", target)
        out["export"] = time.perf_counter() - start
    start = time.perf_counter()
    onnx = OnnxDetector(work / "model", work / "model.onnx", threads=threads)
    out["ort_load"] = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, images, 8):
        onnx.predict(data[i : i + 8])
    out["ort_predict"] = time.perf_counter() - start
    print(json.dumps(out))


def run_child(threads: int, cores: str, images: int, work: Path, export: bool) -> dict[str, float]:
    cmd = ["taskset", "-c", cores, sys.executable, __file__, "--child", str(threads), "--images", str(images)]
    cmd += ["--work", str(work)] + (["--export"] if export else [])
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SPOTDIFF_THREADS")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loads", default="0,1,2", help="busy-loop processes (pinned to cores 0, 1, ...)")
    ap.add_argument("--cores", default="1,2", help="cores the measured process may use (taskset -c 0 / 0-1)")
    ap.add_argument("--export", action="store_true", help="also time export_onnx (tens of seconds per child)")
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.images, args.work, args.export)
        return
    ncpu = os.cpu_count() or 1
    print(
        f"# threads_rule_bench: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {ncpu} CPUs, "
        f"{args.images} images, {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}"
    )
    work = Path(tempfile.mkdtemp(prefix="threads_bench-"))
    prepare(work, args.images)
    print("| cores | busy loops | load avg | phase | 1 thread s | 2 threads s | 2 / 1 |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    try:
        for ncores in (int(c) for c in args.cores.split(",")):
            cores = "0" if ncores == 1 else f"0-{ncores - 1}"
            for nload in (int(x) for x in args.loads.split(",")):
                loops = [
                    subprocess.Popen(["taskset", "-c", str(i % ncpu), sys.executable, "-c", "while True: pass"])
                    for i in range(nload)
                ]
                try:
                    time.sleep(1.0 if nload else 0.0)
                    best: dict[int, dict[str, float]] = {1: {}, 2: {}}
                    loads = []
                    for _ in range(args.rounds):
                        for threads in (1, 2):
                            loads.append(os.getloadavg()[0])
                            got = run_child(threads, cores, args.images, work, args.export)
                            for k, v in got.items():
                                best[threads][k] = min(best[threads].get(k, float("inf")), v)
                finally:
                    for p in loops:
                        p.kill()
                        p.wait()
                load = f"{min(loads):.1f}-{max(loads):.1f}"
                for phase in PHASES:
                    if phase not in best[1]:
                        continue
                    one, two = best[1][phase], best[2][phase]
                    print(
                        f"| {ncores} | {nload} | {load} | {phase} | {one:.2f} | {two:.2f} | {two / one:.2f} |",
                        flush=True,
                    )

    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
