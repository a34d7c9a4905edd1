"""Pixel-metric speed and memory of spotdiff.metrics against two peers on the same arrays.

Peers, timed in the same process on the same maps and masks:
  * a 200-threshold loop like the official VisA evaluation: thresholds evenly spaced over
    [min, max] of the maps; for each one, TP and FP counted over every pixel (a lean version,
    and one that also does the official code's uint8 round trip of each prediction);
  * scikit-learn's exact ``roc_auc_score`` + ``average_precision_score`` on the flattened pixels.
spotdiff computes all four pixel metrics (AU-ROC, AU-PR, AP, AU-PRO) exactly, and its values are
checked against scikit-learn here too.

Data: ``--maps`` maps of ``--size`` squared pixels (default 500 x 256 x 256 = 32.8 M pixels),
smooth Gaussian-filtered noise; half of the images get 1-4 round defects (a mask blob with a
smooth bump of anomaly score on it, wider than the blob so that border pixels overlap the
normal scores).

Usage:  PYTHONPATH=src python benchmarks/metrics_bench.py            # full run (a few minutes, mostly sklearn)
        PYTHONPATH=src python benchmarks/metrics_bench.py --maps 50  # quick run
"""

from __future__ import annotations

import argparse
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy
import sklearn
from scipy import ndimage
from sklearn import metrics as skm

from spotdiff import metrics


def make_maps(n_maps: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image scores, image labels, float32 maps (n, size, size), bool masks)."""
    rng = np.random.default_rng(seed)
    maps = np.empty((n_maps, size, size), dtype=np.float32)
    masks = np.zeros((n_maps, size, size), dtype=bool)
    labels = np.arange(n_maps) % 2 == 1
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    for i in range(n_maps):
        noise = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
        maps[i] = ndimage.gaussian_filter(noise, sigma=3) * 4.0 + 1.0
        if labels[i]:
            for _ in range(rng.integers(1, 5)):
                radius = rng.uniform(0.02, 0.08) * size
                cy, cx = rng.uniform(radius, size - radius, 2)
                d2 = (yy - cy) ** 2 + (xx - cx) ** 2
                masks[i] |= d2 <= radius**2
                maps[i] += rng.uniform(0.5, 2.0) * np.exp(-d2 / (2 * (0.8 * radius) ** 2))
    scores = maps.reshape(n_maps, -1).max(axis=1).astype(np.float64)
    return scores, labels, maps, masks


def threshold_loop(
    maps: np.ndarray, masks: np.ndarray, n_thresholds: int = 200, uint8_round_trip: bool = False
) -> tuple[float, float]:
    """AU-ROC and AU-PR from TP/FP counted at evenly spaced thresholds (binned, approximate).

    ``uint8_round_trip`` adds the per-threshold work of the official VisA code, which turns
    each boolean prediction into uint8 and back before counting.
    """
    normal = ~masks
    n_pos, n_neg = int(masks.sum()), int(normal.sum())
    tps, fps = [], []
    for t in np.linspace(maps.min(), maps.max(), n_thresholds):
        predicted = maps >= t
        if uint8_round_trip:
            predicted = predicted.astype(np.uint8) == 1
        tps.append(np.logical_and(predicted, masks).sum())
        fps.append(np.logical_and(predicted, normal).sum())
    tpr = np.array(tps[::-1] + [n_pos]) / n_pos
    fpr = np.array(fps[::-1] + [n_neg]) / n_neg
    tp, fp = np.array(tps[::-1], float), np.array(fps[::-1], float)
    precision = np.divide(tp, tp + fp, out=np.ones_like(tp), where=tp + fp > 0)
    return float(np.trapezoid(np.r_[0, tpr], np.r_[0, fpr])), float(
        np.trapezoid(np.r_[1, precision], np.r_[0, tp / n_pos])
    )


def timed(fn, *args, repeat: int = 1):
    """(best CPU seconds, best wall seconds, result) over ``repeat`` calls.

    CPU time (``time.process_time``) is the fair clock on a shared machine: other processes
    stretch the wall time of whichever run they overlap with.
    """
    best_cpu, best_wall, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        cpu, wall = time.process_time(), time.perf_counter()
        result = fn(*args)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return best_cpu, best_wall, result


def rss_peak_delta_mib(fn, *args) -> float | None:
    """Peak RSS growth during fn (Linux: reset VmHWM via /proc/self/clear_refs)."""

    def read(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
        raise KeyError(field)

    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = read("VmRSS:")
        fn(*args)
        return (read("VmHWM:") - before) / 1024
    except (OSError, KeyError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=500, help="number of maps (default 500)")
    parser.add_argument("--size", type=int, default=256, help="map side in pixels (default 256)")
    parser.add_argument("--repeat", type=int, default=3, help="spotdiff timing: best of N (default 3)")
    args = parser.parse_args()

    scores, labels, maps, masks = make_maps(args.maps, args.size)
    map_mib = maps.nbytes / 2**20
    print(
        f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
        f"numpy {np.__version__}, scipy {scipy.__version__}, scikit-learn {sklearn.__version__}"
    )
    print(
        f"data: {args.maps} maps of {args.size}x{args.size} = {maps.size / 1e6:.1f} M pixels "
        f"({map_mib:.0f} MiB float32), {masks.sum() / 1e3:.0f} k anomalous pixels "
        f"({100 * masks.mean():.2f} %), {int(labels.sum())} anomalous images"
    )

    # memory first: the first call finds no freed memory of an earlier call to reuse
    rss_mib = rss_peak_delta_mib(metrics.evaluate, scores, labels, maps, masks)
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    metrics.evaluate(scores, labels, maps, masks)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    traced_mib = (peak - base) / 2**20

    ours_cpu, ours_wall, ours = timed(metrics.evaluate, scores, labels, maps, masks, repeat=args.repeat)
    loop_cpu, loop_wall, loop = timed(threshold_loop, maps, masks)
    official_cpu, official_wall, _ = timed(threshold_loop, maps, masks, 200, True)
    y, s = masks.reshape(-1), maps.reshape(-1)
    sk_cpu, sk_wall, (sk_auroc, sk_ap) = timed(lambda: (skm.roc_auc_score(y, s), skm.average_precision_score(y, s)))
    sk_precision, sk_recall, _ = skm.precision_recall_curve(y, s)
    sk_aupr = skm.auc(sk_recall, sk_precision)

    print()
    print(f"{'':58s} {'CPU s':>7s} {'ratio':>6s}   {'wall s':>7s} {'ratio':>6s}")
    rows = [
        (f"spotdiff evaluate, 4 pixel + 3 image metrics (best of {args.repeat})", ours_cpu, ours_wall),
        ("200-threshold loop (TP/FP per threshold)", loop_cpu, loop_wall),
        ("  same, with the official code's uint8 round trip", official_cpu, official_wall),
        ("sklearn roc_auc_score + average_precision_score", sk_cpu, sk_wall),
    ]
    for name, cpu, wall in rows:
        print(f"{name:58s} {cpu:7.2f} {cpu / ours_cpu:5.1f}x   {wall:7.2f} {wall / ours_wall:5.1f}x")
    print()
    print(
        f"pixel_auroc {ours['pixel_auroc']:.8f}  sklearn {sk_auroc:.8f}  diff {abs(ours['pixel_auroc'] - sk_auroc):.1e}"
        f"  (200-threshold loop {loop[0]:.6f})"
    )
    print(f"pixel_ap    {ours['pixel_ap']:.8f}  sklearn {sk_ap:.8f}  diff {abs(ours['pixel_ap'] - sk_ap):.1e}")
    print(
        f"pixel_aupr  {ours['pixel_aupr']:.8f}  sklearn {sk_aupr:.8f}  diff {abs(ours['pixel_aupr'] - sk_aupr):.1e}"
        f"  (200-threshold loop {loop[1]:.6f})"
    )
    print(f"pixel_aupro {ours['pixel_aupro']:.8f}")
    print()
    print(
        f"peak extra memory, tracemalloc: {traced_mib:6.1f} MiB = {traced_mib / map_mib:.2f} x the maps ({map_mib:.0f} MiB)"
    )
    if rss_mib is not None:
        print(f"peak extra memory, RSS (VmHWM): {rss_mib:6.1f} MiB = {rss_mib / map_mib:.2f} x the maps")


if __name__ == "__main__":
    main()
