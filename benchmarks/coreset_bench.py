"""PatchCore's greedy k-center coreset at VisA scale: the round-based exact selection
(``spotdiff.detect.coreset.greedy_k_center``) against the previous loop (one matrix-vector product
per centre, kept below verbatim as ``previous_greedy``), in the same process, on real patch features,
beside the backbone forward's CPU time per image measured in the same run.

Problem size, from our defaults: Wide-ResNet-50 ``layer2`` + ``layer3`` at 256 px gives a 32 x 32
grid, 1,024 patches per image; 900 images give 921,600 rows of 1,536 channels, projected to
``projection_dim`` = 128 for the selection. With ``coreset_shard`` = 65,536 they are cut into
ceil(921,600 / 65,536) = 15 shards of 61,440 rows, each keeping 10 % = 6,144 centres (92,160 in
all). One such shard is the features of 60 images, which is what ``--images 60`` measures; the
900-image coreset time is 15 x the shard's (every shard has the same size).

Features: random-init Wide-ResNet-50 (seed 0; no ImageNet weights offline) on the first
``--images`` magnetic-tile training images (``../shared/realdata/magnetic_tile``) at 256 px, each
patch projected as ``PatchCore.fit`` does. The forward (``PatchCore._embed``: backbone + patch
embedding) is timed on images decoded beforehand, so it is the fit's floor; its CPU time per image
x 900 is an extrapolation. All timings are process CPU time on ``--threads`` torch threads.

Also measured: whether both selections are the same indices in the same order and as a set (the
previous loop rounds in float32 without centring, so it can swap near-tied rows), the new
selection against a float32 screen (how often its error bounds overlapped and how often its own
argmax would have been another row), and, in a child process, the peak resident memory the new
selection adds on one shard and on all 921,600 rows at once (Gaussian rows, ``--memory-select``
centres: the memory does not grow with the number of centres beyond one index per centre).

Usage (each part takes 3-5 minutes on 1 thread at load 3-6; the float32 screen is most of ``speed``)::

    PYTHONPATH=src nice -n 10 python benchmarks/coreset_bench.py [--part speed] [--images 60] [--json out.json]
    PYTHONPATH=src nice -n 10 python benchmarks/coreset_bench.py --part fit --images 60
    PYTHONPATH=src nice -n 10 python benchmarks/coreset_bench.py --part auroc --auroc-images 100 --auroc-test 80

``--part fit`` times ``PatchCore.fit`` with each selection against the forward (:func:`fit_ratio`);
``--part auroc`` tests both banks (:func:`auroc`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "magnetic_tile"
VISA_ROWS = 900 * 1024
SHARD = 65_536


def previous_greedy(z: torch.Tensor, n_select: int, first: int) -> list[int]:
    """The selection loop of ``greedy_coreset`` before this change (commit 776548b), verbatim but for
    the progress bar: one float32 vector-matrix product over all rows per centre."""
    m = z.shape[0]
    z_t = z.float().T.contiguous()
    sq_norm = torch.einsum("ij,ij->j", z_t, z_t)
    current = first
    selected = torch.empty(n_select, dtype=torch.int64)
    min_dist = torch.full((1, m), float("inf"), dtype=z_t.dtype, device=z_t.device)
    dist = torch.empty_like(min_dist)
    for i in range(n_select):
        selected[i] = current
        torch.matmul(z_t[:, current][None], z_t, out=dist)
        dist.mul_(-2.0).add_(sq_norm).add_(sq_norm[current])
        torch.minimum(min_dist, dist, out=min_dist)
        current = int(torch.argmax(min_dist))
    return selected.tolist()


def cpu_timed(fn: Any) -> tuple[Any, float]:
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def status_bytes(key: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def features(root: Path, n_images: int) -> tuple[torch.Tensor, float]:
    """Projected patch features ``(n_images * 1024, 128)`` and the forward's CPU s per image."""
    from spotdiff.data import open_magnetic_tile
    from spotdiff.data.transforms import normalize
    from spotdiff.detect import PatchCore
    from spotdiff.detect.base import CPU_FORWARD_IMAGES
    from spotdiff.detect.patchcore import project, projection_matrix

    model = PatchCore(arch="wide_resnet50_2", seed=0)
    model.check_params()._build_backbone(model.weights)
    train = open_magnetic_tile(root, "train", image_size=256, seed=0)
    if len(train) < n_images:
        raise SystemExit(f"{root} holds {len(train)} training images, fewer than --images {n_images}")
    images = normalize(torch.stack([train[i]["image"] for i in range(n_images)]))
    parts: list[torch.Tensor] = []

    def forward() -> None:
        with torch.inference_mode():
            for a in range(0, n_images, CPU_FORWARD_IMAGES):
                emb = model._embed(images[a : a + CPU_FORWARD_IMAGES])
                parts.append(emb.reshape(-1, emb.shape[-1]))

    _, cpu = cpu_timed(forward)
    full = torch.cat(parts)
    z = project(full, projection_matrix(full.shape[1], model.projection_dim, model.seed))
    return z, cpu / n_images


def compare(z: torch.Tensor, n_select: int, first: int) -> dict[str, Any]:
    """New (twice, around the previous loop) and previous selection on the same rows, same process."""
    from spotdiff.detect.coreset import CoresetStats, greedy_k_center

    stats = CoresetStats()
    new, new_cpu = cpu_timed(lambda: greedy_k_center(z, n_select, first, stats=stats).tolist())
    old, old_cpu = cpu_timed(lambda: previous_greedy(z, n_select, first))
    again, new_cpu2 = cpu_timed(lambda: greedy_k_center(z, n_select, first).tolist())
    stats32 = CoresetStats()
    new32, new32_cpu = cpu_timed(
        lambda: greedy_k_center(z, n_select, first, screen_dtype=torch.float32, stats=stats32).tolist()
    )
    diverge = next((i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b), None)
    return {
        "rows": len(z),
        "centres": n_select,
        "new_cpu_s": [new_cpu, new_cpu2],
        "previous_cpu_s": old_cpu,
        "speed_up": old_cpu / min(new_cpu, new_cpu2),
        "new_stats": vars(stats),
        "same_order": old == new,
        "same_set": set(old) == set(new),
        "first_divergence": diverge,
        "common_centres": len(set(old) & set(new)),
        "repeatable": again == new,
        "float32_screen": {"cpu_s": new32_cpu, "same_as_float64_screen": new32 == new, "stats": vars(stats32)},
    }


def auroc(args: argparse.Namespace) -> dict[str, Any]:
    """Image / pixel AU-ROC of PatchCore with the new and the previous selection, same features.

    One ``PatchCore.fit`` (Wide-ResNet-50, defaults) on ``--auroc-images`` magnetic-tile training
    images; inside it the projected patches are also given to the previous loop (same shards, same
    first rows) and its bank is read from the same feature file. Then the exact greedy (no shards)
    both ways. Each bank is tested on the same ``--auroc-test`` test images (evenly spread; the
    test embeddings are computed once and reused).
    """
    import hashlib

    import spotdiff.detect.patchcore as pc
    from spotdiff.data import open_magnetic_tile
    from spotdiff.detect import PatchCore
    from spotdiff.detect.evaluate import evaluate_detector

    def previous_coreset(z: torch.Tensor, n: int, projection_dim: Any, seed: int) -> torch.Tensor:
        first = int(torch.randint(len(z), (1,), generator=torch.Generator().manual_seed(seed)))
        return torch.tensor(previous_greedy(z, n, first))

    banks: dict[str, dict[str, Any]] = {}
    captured: dict[str, Any] = {}
    sharded, read_rows, greedy = pc.sharded_coreset, pc._read_rows, pc.greedy_coreset

    def sharded_both(z: torch.Tensor, n: int, shard: int | None, seed: int = 0) -> torch.Tensor:
        captured["z"] = z.clone()
        keep, cpu = cpu_timed(lambda: sharded(z, n, shard, seed))
        pc.greedy_coreset = previous_coreset
        try:
            captured["keep_previous"], cpu_old = cpu_timed(lambda: sharded(z, n, shard, seed))
        finally:
            pc.greedy_coreset = greedy
        captured.update(keep=keep, cpu=cpu, cpu_previous=cpu_old)
        return keep

    def read_both(spill: Any, rows: torch.Tensor, channels: int) -> torch.Tensor:
        captured["all"] = read_rows(spill, torch.arange(len(captured["z"])), channels)
        return captured["all"][rows]

    train = open_magnetic_tile(args.real_root, "train", image_size=256, seed=0).subset(range(args.auroc_images))
    test = open_magnetic_tile(args.real_root, "test", image_size=256, seed=0)
    test = test.subset([round(i * (len(test) - 1) / (args.auroc_test - 1)) for i in range(args.auroc_test)])
    model = PatchCore(arch="wide_resnet50_2", seed=0)
    pc.sharded_coreset, pc._read_rows = sharded_both, read_both
    try:
        _, fit_cpu = cpu_timed(lambda: model.fit(train))
    finally:
        pc.sharded_coreset, pc._read_rows = sharded, read_rows
    z, full = captured["z"], captured["all"]
    n = len(model.memory_bank_)
    exact_new, exact_cpu = cpu_timed(lambda: greedy(z, n, None, model.seed))
    exact_old, exact_old_cpu = cpu_timed(lambda: previous_coreset(z, n, None, model.seed))
    selections = {
        "sharded, new": (captured["keep"], captured["cpu"]),
        "sharded, previous": (captured["keep_previous"], captured["cpu_previous"]),
        "exact, new": (exact_new, exact_cpu),
        "exact, previous": (exact_old, exact_old_cpu),
    }
    embed, cache = model._embed, {}

    def cached_embed(images: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha1(images.cpu().numpy().tobytes()).hexdigest()
        if key not in cache:
            cache[key] = embed(images)
        return cache[key]

    model._embed = cached_embed  # type: ignore[method-assign]
    for name, (keep, cpu) in selections.items():
        model._set_bank(full[keep].contiguous())
        metrics = evaluate_detector(model, test)[0]
        banks[name] = {
            "cpu_s": cpu,
            "rows": len(keep),
            "image_auroc": metrics["image_auroc"],
            "pixel_auroc": metrics["pixel_auroc"],
        }
    return {
        "train_images": len(train),
        "test_images": len(test),
        "fit_cpu_s": fit_cpu,
        "banks": banks,
        "sharded_same_set": set(captured["keep"].tolist()) == set(captured["keep_previous"].tolist()),
        "sharded_common": len(set(captured["keep"].tolist()) & set(captured["keep_previous"].tolist())),
        "exact_same_set": set(exact_new.tolist()) == set(exact_old.tolist()),
        "exact_common": len(set(exact_new.tolist()) & set(exact_old.tolist())),
    }


def fit_ratio(args: argparse.Namespace) -> dict[str, Any]:
    """``PatchCore.fit`` (Wide-ResNet-50, defaults) on ``--images`` magnetic-tile training images with the new
    and with the previous selection (``greedy_coreset`` swapped in the module), against the forward over the
    same images decoded beforehand; all in CPU time. With the default shard, every term of the fit
    (forward, one greedy per 61,440 patches, projection, feature file, the 16-image normal-map scoring
    against a bank of 10 % of the patches) grows in proportion to the images, so fit / forward at 60 images
    (one full shard) is the ratio at 900 (15 shards)."""
    import spotdiff.detect.patchcore as pc
    from spotdiff.data import open_magnetic_tile
    from spotdiff.detect import PatchCore

    def previous_coreset(z: torch.Tensor, n: int, projection_dim: Any, seed: int) -> torch.Tensor:
        first = int(torch.randint(len(z), (1,), generator=torch.Generator().manual_seed(seed)))
        return torch.tensor(previous_greedy(z, n, first))

    train = open_magnetic_tile(args.real_root, "train", image_size=256, seed=0).subset(range(args.images))
    _, forward = features(args.real_root, args.images)
    out: dict[str, Any] = {"images": args.images, "forward_cpu_s": forward * args.images}
    arms = {"new": pc.greedy_coreset, "previous": previous_coreset, "new again": pc.greedy_coreset}
    for name, greedy in ((n, arms[n]) for n in args.fit_arms.split(",")):
        original = pc.greedy_coreset
        pc.greedy_coreset = greedy
        try:
            model = PatchCore(arch="wide_resnet50_2", seed=0)
            _, cpu = cpu_timed(lambda m=model: m.fit(train))
        finally:
            pc.greedy_coreset = original
        out[name] = {
            "fit_cpu_s": cpu,
            "fit_over_forward": cpu / out["forward_cpu_s"],
            "bank_rows": int(model.memory_bank_.shape[0]),
        }
    return out


def child_memory(rows: int, select: int, shard_file: str | None) -> dict[str, Any]:
    """Peak RSS during one new selection above the RSS with the rows loaded (a fresh process)."""
    from spotdiff.detect.coreset import greedy_k_center

    if shard_file:
        z = torch.load(shard_file, weights_only=True)
    else:
        z = torch.randn(rows, 128, generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak (VmHWM) to the current RSS
    before = status_bytes("VmRSS")
    _, cpu = cpu_timed(lambda: greedy_k_center(z, select, 0))
    return {
        "rows": len(z),
        "centres": select,
        "input_bytes": z.numel() * 4,
        "extra_peak_rss": status_bytes("VmHWM") - before,
        "cpu_s": cpu,
    }


def run_memory_child(args: argparse.Namespace, rows: int, select: int, shard_file: str | None) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child-memory",
        "--threads",
        str(args.threads),
        "--memory-rows",
        str(rows),
        "--memory-select",
        str(select),
    ] + (["--shard-file", shard_file] if shard_file else [])
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env={**os.environ, "SPOTDIFF_QUIET": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-root", type=Path, default=DEFAULT_REAL)
    parser.add_argument("--images", type=int, default=60, help="images whose patches form one shard (60: 61,440 rows)")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-select", type=int, default=2048)
    parser.add_argument("--part", choices=["speed", "auroc", "fit"], default="speed")
    parser.add_argument("--auroc-images", type=int, default=100)
    parser.add_argument("--auroc-test", type=int, default=80)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--fit-arms",
        default="new,previous,new again",
        help="--part fit: the selections to fit with, in order (comma-separated: new, previous, new again)",
    )
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-rows", type=int, default=VISA_ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--shard-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from spotdiff.progress import set_quiet

    set_quiet(True)
    if args.child_memory:
        print(json.dumps(child_memory(args.memory_rows, args.memory_select, args.shard_file)))
        return
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_start": os.getloadavg(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if args.part in ("auroc", "fit"):
        out[args.part] = auroc(args) if args.part == "auroc" else fit_ratio(args)
        out["load_end"] = os.getloadavg()
        if args.json:  # before the report, so a report error loses no measurement
            args.json.write_text(json.dumps(out, indent=1))
        print(report_auroc(out) if args.part == "auroc" else report_fit(out))
        return
    z, forward_per_image = features(args.real_root, args.images)
    out["forward_cpu_s_per_image"] = forward_per_image
    n_select = int(len(z) * args.ratio)
    first = int(torch.randint(len(z), (1,), generator=torch.Generator().manual_seed(0)))
    out["shard"] = compare(z, n_select, first)
    shard_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"coreset-bench-{os.getpid()}.pt"
    torch.save(z, shard_file)
    try:
        out["memory_shard"] = run_memory_child(args, len(z), n_select, str(shard_file))
    finally:
        shard_file.unlink()
    out["memory_visa_rows"] = run_memory_child(args, VISA_ROWS, args.memory_select, None)
    out["load_end"] = os.getloadavg()
    shards = -(-VISA_ROWS // SHARD)
    scale = shards * (VISA_ROWS / shards / len(z)) ** 2  # the cost grows with rows x centres
    forward_900 = 900 * forward_per_image
    new_900 = scale * min(out["shard"]["new_cpu_s"])
    old_900 = scale * out["shard"]["previous_cpu_s"]
    out["extrapolated_900"] = {
        "forward_cpu_s": forward_900,
        "coreset_new_cpu_s": new_900,
        "coreset_previous_cpu_s": old_900,
        "shards": shards,
        "forward_plus_new_over_forward": (forward_900 + new_900) / forward_900,
        "forward_plus_previous_over_forward": (forward_900 + old_900) / forward_900,
    }
    print(report(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def report(out: dict[str, Any]) -> str:
    s, e = out["shard"], out["extrapolated_900"]
    f32 = s["float32_screen"]["stats"]
    lines = [
        (
            f"Coreset benchmark, {out['date']}, {out['threads']} thread(s), load average "
            f"{out['load_start'][0]:.1f} -> {out['load_end'][0]:.1f}, torch {out['torch']}"
        ),
        "",
        "| measure | value |",
        "|---|---|",
        f"| forward (backbone + patch embedding), CPU s per image | {out['forward_cpu_s_per_image']:.3f} |",
        f"| shard: rows x centres | {s['rows']:,} x {s['centres']:,} (128-d projections) |",
        f"| new selection, CPU s (two runs) | {s['new_cpu_s'][0]:.2f}, {s['new_cpu_s'][1]:.2f} |",
        f"| previous loop, CPU s | {s['previous_cpu_s']:.2f} |",
        f"| speed-up (previous / best new) | **{s['speed_up']:.1f}x** |",
        f"| rounds; exact decisions (float64 screen) | {s['new_stats']['rounds']}; {s['new_stats']['exact_decisions']} |",
        (
            f"| same indices, same order as the previous loop | {s['same_order']} (first difference at step "
            f"{s['first_divergence']}) |"
        ),
        f"| same set as the previous loop | {s['same_set']} ({s['common_centres']:,} of {s['centres']:,} in common) |",
        (
            f"| float32 screen: CPU s; bounds overlapped (exact decisions); its own argmax wrong | "
            f"{s['float32_screen']['cpu_s']:.2f}; {f32['exact_decisions']} of {s['centres'] - 1}; "
            f"{f32['screen_would_differ']} |"
        ),
        (
            f"| peak RSS added, one shard ({out['memory_shard']['rows']:,} rows, input "
            f"{out['memory_shard']['input_bytes'] / 1e6:.0f} MB) | {out['memory_shard']['extra_peak_rss'] / 1e6:.0f} MB |"
        ),
        (
            f"| peak RSS added, all {out['memory_visa_rows']['rows']:,} rows at once (input "
            f"{out['memory_visa_rows']['input_bytes'] / 1e6:.0f} MB, {out['memory_visa_rows']['centres']} centres) | "
            f"{out['memory_visa_rows']['extra_peak_rss'] / 1e6:.0f} MB |"
        ),
        f"| 900 images, extrapolated: forward CPU s | {e['forward_cpu_s']:.0f} |",
        (
            f"| 900 images, extrapolated: coreset CPU s, new / previous ({e['shards']} shards) | "
            f"{e['coreset_new_cpu_s']:.0f} / {e['coreset_previous_cpu_s']:.0f} |"
        ),
        (
            f"| (forward + coreset) / forward, new / previous | {e['forward_plus_new_over_forward']:.2f} / "
            f"{e['forward_plus_previous_over_forward']:.2f} |"
        ),
    ]
    return "\n".join(lines)


def report_fit(out: dict[str, Any]) -> str:
    f = out["fit"]
    lines = [
        (
            f"PatchCore fit vs forward, {out['date']}, {out['threads']} thread(s), load average "
            f"{out['load_start'][0]:.1f} -> {out['load_end'][0]:.1f}; {f['images']} images, forward "
            f"{f['forward_cpu_s']:.1f} CPU s"
        ),
        "",
        "| selection | fit CPU s | fit / forward | bank rows |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {f[name]['fit_cpu_s']:.1f} | {f[name]['fit_over_forward']:.2f} | {f[name]['bank_rows']:,} |"
        for name in ("new", "previous", "new again")
        if name in f  # --fit-arms
    ]
    return "\n".join(lines)


def report_auroc(out: dict[str, Any]) -> str:
    a = out["auroc"]
    lines = [
        (
            f"Coreset AU-ROC, {out['date']}, {out['threads']} thread(s), load average {out['load_start'][0]:.1f} -> "
            f"{out['load_end'][0]:.1f}; {a['train_images']} training, {a['test_images']} test images"
        ),
        "",
        "| selection | CPU s | bank rows | image AU-ROC | pixel AU-ROC |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {b['cpu_s']:.1f} | {b['rows']:,} | {b['image_auroc']:.4f} | {b['pixel_auroc']:.4f} |"
        for name, b in a["banks"].items()
    ]
    lines.append(
        f"\nsame set, sharded: {a['sharded_same_set']} ({a['sharded_common']:,} in common); "
        f"exact: {a['exact_same_set']} ({a['exact_common']:,} in common)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
