"""PaDiM and PatchCore at the paper's scale: one VisA-sized object, ResNet-50 / Wide-ResNet-50.

Configurations (issue 15):

* ``padim``: ResNet-50, layers 1-3, d = 550, 256 px, ``--images`` training images;
* ``patchcore``: Wide-ResNet-50, layers 2-3, coreset 10 %, 256 px, ``--images`` training images
  (default sharded coreset), test through faiss;
* ``coreset``: the same PatchCore on ``--coreset-images`` images, exact greedy against the
  sharded approximation (shard forced to a quarter of the patches), AU-ROC difference;
* ``accuracy``: PaDiM float32 statistics against a float64 reference fitted on the same
  embeddings of real images (magnetic tile, ``--real-root``), max relative difference of
  ``L^-1`` and of the anomaly maps.

Input: ``spotdiff synth --objects pcb_synth --frame visa --normal ceil(N / 0.9)``, written once
to ``--data`` (1500 x 1000 JPEGs, so decoding and resizing cost what VisA's cost). Every
measurement runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own; each
detector's fit is compared with the backbone-forward floor over the same images measured in the
same run (decoded beforehand, so the floor is the forward pass alone). Backbones are random init
(seeded): no ImageNet weights offline, so AU-ROC values say nothing about VisA.

Full scale (one command; about an hour on 2 cores)::

    PYTHONPATH=src python benchmarks/scale_bench.py --images 900

Reduced scale, as recorded in results_detect.md::

    PYTHONPATH=src nice python benchmarks/scale_bench.py --images 48 --coreset-images 40

Prints one markdown table per configuration and, with ``--json``, writes every figure there.
With ``--anomalib-python PY`` (an environment with anomalib 2.7 and the same torch) PaDiM is also
run through anomalib (``benchmarks/anomalib_padim.py``) on the same images, weights and channel
subset, at each of ``--anomalib-images``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from spotdiff.detect.patchcore import DEFAULT_CORESET_SHARD

DEFAULT_DATA = Path(tempfile.gettempdir()) / "spotdiff-visa-scale"
DEFAULT_REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "magnetic_tile"
OBJECT = "pcb_synth"
PADIM = {"arch": "resnet50", "layers": ["layer1", "layer2", "layer3"], "d": 550}
PATCHCORE = {"arch": "wide_resnet50_2", "layers": ["layer2", "layer3"], "coreset_ratio": 0.1}


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def train_set(data: Path, n: int, size: int) -> Any:
    from spotdiff.data import open_dataset

    train = open_dataset(data, OBJECT, subset="train", image_size=size)
    if len(train) < n:
        raise SystemExit(f"{data} holds {len(train)} training images, fewer than --images {n}")
    return train.subset(range(n))


# ----------------------------------------------------------------------------- children (one per process)
def child_floor(args: argparse.Namespace) -> dict[str, Any]:
    """Backbone forward over the training images, decoded beforehand: the floor of any fit."""
    from spotdiff.data.transforms import normalize
    from spotdiff.detect.base import CPU_FORWARD_IMAGES, make_backbone
    from spotdiff.models import extract_features, inference_backbone

    layers = PADIM["layers"] if args.config == "padim" else PATCHCORE["layers"]
    arch = PADIM["arch"] if args.config == "padim" else PATCHCORE["arch"]
    net = inference_backbone(make_backbone(arch, None, 0), layers)
    data = train_set(args.data, args.images, args.image_size)
    images = torch.stack([data[i]["image"] for i in range(len(data))])

    def forward() -> None:
        with torch.inference_mode():
            for start in range(0, images.shape[0], CPU_FORWARD_IMAGES):
                extract_features(net, normalize(images[start : start + CPU_FORWARD_IMAGES]), layers)

    _, wall, cpu = timed(forward)
    return {"forward_wall_s": wall, "forward_cpu_s": cpu, "images": len(data)}


def _test(model: Any, data: Path, size: int) -> dict[str, Any]:
    from spotdiff.data import open_dataset
    from spotdiff.detect.evaluate import evaluate_detector

    test = open_dataset(data, OBJECT, subset="test", image_size=size)
    (metrics, _, _, _), wall, _ = timed(lambda: evaluate_detector(model, test))
    return {
        "test_images": len(test),
        "test_wall_s": wall,
        "test_images_per_s": len(test) / wall,
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
    }


def child_fit(args: argparse.Namespace) -> dict[str, Any]:
    """Fit + save one detector; peak RSS at the end of fit + save, before testing."""
    from spotdiff.detect import PaDiM, PatchCore
    from spotdiff.detect.gaussian import GaussianAccumulator

    start_rss = peak_rss_bytes()  # after importing torch and spotdiff
    factorisation = [0.0]
    original = GaussianAccumulator.inverse_cholesky_packed

    def timed_factorisation(self: GaussianAccumulator, epsilon: float) -> torch.Tensor:
        out, wall, _ = timed(lambda: original(self, epsilon))
        factorisation[0] += wall
        return out

    GaussianAccumulator.inverse_cholesky_packed = timed_factorisation  # type: ignore[method-assign]
    if args.config == "padim":
        model = PaDiM(**PADIM, seed=0)
    else:
        shard = None if args.coreset_shard == 0 else args.coreset_shard
        kwargs = {} if args.coreset_shard is None else {"coreset_shard": shard}
        model = PatchCore(**PATCHCORE, seed=0, **kwargs)
    built_rss = peak_rss_bytes()
    data = train_set(args.data, args.images, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        _, wall, cpu = timed(lambda: model.fit(data).save(Path(tmp) / "model"))
    fit_peak = peak_rss_bytes()
    out = {
        "images": len(data),
        "fit_wall_s": wall,
        "fit_cpu_s": cpu,
        "peak_rss": fit_peak,
        "rss_after_imports": start_rss,
        "rss_after_model_built": built_rss,
        "model_tensor_bytes": tensor_bytes(model._state()),
        "threads": torch.get_num_threads(),
        "decode_workers": model.num_workers_,
        "factorisation_wall_s": factorisation[0],
    }
    if args.config != "padim":
        out["bank_rows"] = int(model.memory_bank_.shape[0])
        out["coreset_shard"] = model.coreset_shard
        out["nn_backend"] = "faiss" if model._index is not None else "torch"
    return {**out, **_test(model, args.data, args.image_size)}


def child_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """float32 statistics vs a float64 reference on the same embeddings of real images."""
    from spotdiff.data import open_magnetic_tile
    from spotdiff.data.transforms import normalize
    from spotdiff.detect import PaDiM
    from spotdiff.detect.features import upsample_and_smooth
    from spotdiff.detect.gaussian import GaussianAccumulator, mahalanobis

    model = PaDiM(**PADIM, seed=0)
    model.check_params()._build_backbone(model.weights)  # only its feature extractor is used here
    size = args.accuracy_size
    train = open_magnetic_tile(args.real_root, "train", image_size=size, seed=0)
    train = train.subset(range(min(args.accuracy_images, len(train))))
    test = open_magnetic_tile(args.real_root, "test", image_size=size, seed=0)
    test = test.subset(range(0, len(test), max(1, len(test) // args.accuracy_test)))
    accs: list[GaussianAccumulator] = []
    with torch.inference_mode():
        for start in range(0, len(train), 4):
            batch = normalize(torch.stack([train[i]["image"] for i in range(start, min(start + 4, len(train)))]))
            emb = model._embed(batch)
            if not accs:
                accs = [GaussianAccumulator(emb.shape[1], emb.shape[2]) for _ in range(2)]
            accs[0].update(emb)
            accs[1].update(emb.double())
        means = [acc.mean() for acc in accs]
        factors = [acc.inverse_cholesky_packed(model.epsilon).double() for acc in accs]
        rel_l = ((factors[0] - factors[1]).abs().amax(1) / factors[1].abs().amax(1)).max().item()
        worst_map, worst_dist = 0.0, 0.0
        for start in range(0, len(test), 4):
            batch = normalize(torch.stack([test[i]["image"] for i in range(start, min(start + 4, len(test)))]))
            emb = model._embed(batch).double()
            dists = [mahalanobis(emb, m, f).reshape(-1, *model._grid) for m, f in zip(means, factors, strict=True)]
            maps = [upsample_and_smooth(d, (size, size)) for d in dists]
            worst_dist = max(worst_dist, ((dists[0] - dists[1]).abs() / dists[1]).max().item())
            worst_map = max(worst_map, ((maps[0] - maps[1]).abs() / maps[1].abs()).max().item())
    return {
        "train_images": len(train),
        "test_images": len(test),
        "image_size": size,
        "positions": accs[0].positions,
        "d": accs[0].dim,
        "max_rel_diff_inv_cholesky": rel_l,
        "max_rel_diff_distance": worst_dist,
        "max_rel_diff_map": worst_map,
    }


CHILDREN = {"floor": child_floor, "fit": child_fit, "accuracy": child_accuracy}


def run_anomalib(args: argparse.Namespace, images: int) -> dict[str, Any]:
    """anomalib's PaDiM (``benchmarks/anomalib_padim.py`` under ``--anomalib-python``) on the same
    training images, the same random-init ResNet-50 and spotdiff's channel subset; tested on the
    same decoded test images."""
    from safetensors.torch import save_file

    from spotdiff.data import open_dataset
    from spotdiff.detect.base import make_backbone
    from spotdiff.detect.padim import channel_subset

    with tempfile.TemporaryDirectory(prefix="spotdiff-anomalib-") as tmp:
        work = Path(tmp)
        save_file(
            {k: v.contiguous() for k, v in make_backbone(PADIM["arch"], None, 0).state_dict().items()},
            str(work / "weights.safetensors"),
        )
        test = open_dataset(args.data, OBJECT, subset="test", image_size=args.image_size)
        items = [test[i] for i in range(len(test))]
        save_file(
            {
                "images": torch.stack([(it["image"] * 255).round().to(torch.uint8) for it in items]),
                "masks": torch.stack([(it["mask"] > 0).to(torch.uint8) for it in items]),
                "labels": torch.tensor([int(it["label"]) for it in items]),
            },
            str(work / "test.safetensors"),
        )
        spec = {
            "arch": PADIM["arch"],
            "train_paths": train_set(args.data, images, args.image_size).paths,
            "image_size": args.image_size,
            "layers": PADIM["layers"],
            "n_features": PADIM["d"],
            "channel_index": channel_subset(PADIM["arch"], PADIM["layers"], PADIM["d"], 0)[1].tolist(),
            "weights": str(work / "weights.safetensors"),
        }
        (work / "spec.json").write_text(json.dumps(spec))
        cmd = [
            args.anomalib_python,
            str(Path(__file__).with_name("anomalib_padim.py")),
            "--spec",
            str(work / "spec.json"),
            "--test",
            str(work / "test.safetensors"),
            "--threads",
            str(torch.get_num_threads()),
            "--max-memory-gb",
            str(args.anomalib_max_memory_gb),
        ]
        print(f"[{time.strftime('%H:%M:%S')}] anomalib PaDiM, {images} images", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- parent
def run_child(kind: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--data",
        str(args.data),
        "--real-root",
        str(args.real_root),
        "--image-size",
        str(args.image_size),
        "--accuracy-size",
        str(args.accuracy_size),
        "--accuracy-images",
        str(args.accuracy_images),
        "--accuracy-test",
        str(args.accuracy_test),
    ]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env={**os.environ, "SPOTDIFF_QUIET": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_data(args: argparse.Namespace, images: int) -> None:
    """Write the VisA-size synth to ``--data`` unless it already holds ``images`` training images
    (a larger one is kept: regenerating would replace it under any run still reading it)."""
    from spotdiff.data import open_dataset
    from spotdiff.data.synth import VISA_FRAME, generate
    from spotdiff.progress import set_quiet

    set_quiet(True)
    if (args.data / "SYNTH.json").is_file() and len(open_dataset(args.data, OBJECT, subset="train")) >= images:
        return
    normal = math.ceil(images / 0.9)
    while round(0.9 * normal) < images:
        normal += 1
    generate(args.data, seed=0, scale=1.0, image_size=384, objects=[OBJECT], normal=normal, frame=VISA_FRAME)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def report(results: dict[str, Any]) -> str:
    lines = [
        f"Date {results['date']}; load average at start {results['load_start']}, at end {results.get('load_end', 'n/a')}; "
        f"{results['machine']}; torch {results['torch']}. Random-init backbones (seed 0); input "
        f"`{OBJECT}` at 1500x1000 JPEG resized to {results['args']['image_size']} px.",
        "",
    ]
    for name, target in (("padim", "1.15x"), ("patchcore", "15 min at 900 images")):
        if name not in results:
            continue
        fit, floor = results[name], results[f"{name}_floor"]
        lines += [
            f"### {name}: {fit['images']} training images, {fit['test_images']} test images",
            "",
            "| measure | value |",
            "|---|---|",
            f"| fit + save wall / CPU s | {fit['fit_wall_s']:.1f} / {fit['fit_cpu_s']:.1f} |",
            f"| backbone forward floor wall / CPU s (same images, same run) | "
            f"{floor['forward_wall_s']:.1f} / {floor['forward_cpu_s']:.1f} |",
            f"| fit / floor (wall; CPU) | {fit['fit_wall_s'] / floor['forward_wall_s']:.2f}; "
            f"{fit['fit_cpu_s'] / floor['forward_cpu_s']:.2f} (target {target}) |",
            *(
                [f"| of which the float64 factorisation of L^-1 (wall s) | {fit['factorisation_wall_s']:.1f} |"]
                if name == "padim"
                else []
            ),
            f"| model tensors (stored form) | {gb(fit['model_tensor_bytes'])} |",
            f"| peak RSS of the fit process | {gb(fit['peak_rss'])} "
            f"({fit['peak_rss'] / fit['model_tensor_bytes']:.2f}x the model tensors; "
            f"{gb(fit['rss_after_model_built'])} after imports and backbone; above that "
            f"{(fit['peak_rss'] - fit['rss_after_model_built']) / fit['model_tensor_bytes']:.2f}x) |",
            f"| test images/s ({fit.get('nn_backend', 'mahalanobis')}) | {fit['test_images_per_s']:.2f} |",
            f"| image / pixel AU-ROC | {fit['image_auroc']:.4f} / {fit['pixel_auroc']:.4f} |",
            "",
        ]
    for key in sorted(k for k in results if k.startswith("anomalib_")):
        theirs, ours = results[key], results[f"padim_for_{key}"]
        lines += [
            f"### PaDiM side by side with anomalib {theirs['anomalib']}: {theirs['images']} training images "
            f"(same images, random-init weights and channel subset)",
            "",
            "| measure | spotdiff | anomalib | spotdiff / anomalib |",
            "|---|---|---|---|",
        ]
        if "error" in theirs:
            cap = f" under a {theirs['cap_gb']:g} GB address-space cap" if theirs["cap_gb"] > 0 else ""
            lines += [
                f"| fit | {ours['fit_wall_s']:.1f} s wall, peak {gb(ours['peak_rss'])} | failed after "
                f"{theirs['fit_wall_s']:.0f} s{cap}: "
                f"{theirs['error']} (peak RSS {gb(theirs['peak_rss'])}) | n/a |",
                "",
            ]
            continue
        lines += [
            f"| fit wall s (decode + forward + statistics) | {ours['fit_wall_s']:.1f} | {theirs['fit_wall_s']:.1f} | "
            f"{ours['fit_wall_s'] / theirs['fit_wall_s']:.2f} |",
            f"| fit CPU s (main process) | {ours['fit_cpu_s']:.1f} | {theirs['fit_cpu_s']:.1f} | "
            f"{ours['fit_cpu_s'] / theirs['fit_cpu_s']:.2f} |",
            f"| peak RSS | {gb(ours['peak_rss'])} | {gb(theirs['peak_rss'])} | {ours['peak_rss'] / theirs['peak_rss']:.2f} |",
            f"| model tensors | {gb(ours['model_tensor_bytes'])} | {gb(theirs['model_tensor_bytes'])} | "
            f"{ours['model_tensor_bytes'] / theirs['model_tensor_bytes']:.2f} |",
            f"| image AU-ROC | {ours['image_auroc']:.4f} | {theirs['image_auroc']:.4f} | "
            f"{ours['image_auroc'] - theirs['image_auroc']:+.4f} (difference) |",
            f"| pixel AU-ROC | {ours['pixel_auroc']:.4f} | {theirs['pixel_auroc']:.4f} | "
            f"{ours['pixel_auroc'] - theirs['pixel_auroc']:+.4f} (difference) |",
            "",
        ]
    if "coreset_exact" in results:
        exact, approx = results["coreset_exact"], results.get("coreset_sharded")
        lines += [
            f"### PatchCore coreset: exact greedy vs sharded ({exact['images']} images)",
            "",
            "| coreset | shard (patches) | bank rows | fit wall s | image AU-ROC | pixel AU-ROC |",
            "|---|---|---|---|---|---|",
        ]
        runs = [
            ("exact", exact),
            ("sharded, default shard", results.get("coreset_default")),
            ("sharded, 4 shards", approx),
        ]
        for label, r in runs:
            if r is None:
                continue
            lines.append(
                f"| {label} | {r['coreset_shard']} | {r['bank_rows']} | {r['fit_wall_s']:.1f} | "
                f"{r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} |"
            )
        lines.append("")
        for label, r in runs[1:]:
            if r is not None:
                lines.append(
                    f"Difference {label} - exact: image {r['image_auroc'] - exact['image_auroc']:+.4f}, "
                    f"pixel {r['pixel_auroc'] - exact['pixel_auroc']:+.4f} (target |diff| <= 0.005)."
                )
        lines.append("")
    if "accuracy" in results:
        a = results["accuracy"]
        lines += [
            f"### PaDiM float32 statistics vs float64 reference (magnetic tile, {a['train_images']} train, "
            f"{a['test_images']} test images, {a['image_size']} px, {a['positions']} positions, d = {a['d']})",
            "",
            f"max relative difference: L^-1 {a['max_rel_diff_inv_cholesky']:.2e} (per position, max-norm), "
            f"Mahalanobis distance {a['max_rel_diff_distance']:.2e}, anomaly map {a['max_rel_diff_map']:.2e}",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=900, help="training images (paper scale: 900)")
    p.add_argument("--image-size", type=int, default=256, help="input size in px (issue's configurations: 256)")
    p.add_argument("--coreset-images", type=int, default=100, help="images of the exact-vs-sharded coreset case")
    p.add_argument("--configs", default="padim,patchcore,coreset,accuracy")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="VisA-size synth root (written if needed)")
    p.add_argument("--real-root", type=Path, default=DEFAULT_REAL)
    p.add_argument("--accuracy-size", type=int, default=256, help="image size of the float64 comparison")
    p.add_argument("--accuracy-images", type=int, default=200)
    p.add_argument("--accuracy-test", type=int, default=40)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--anomalib-python",
        default=None,
        help="python of an environment with anomalib 2.7: also run its PaDiM on the same input",
    )
    p.add_argument(
        "--anomalib-images",
        default=None,
        help="comma list of training-image counts for the anomalib comparison (default: --images)",
    )
    p.add_argument(
        "--anomalib-max-memory-gb",
        type=float,
        default=18.0,
        help="address-space cap of the anomalib process (running out is reported, not fatal; 0: none)",
    )
    # child-only
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--config", default="padim", help=argparse.SUPPRESS)
    p.add_argument("--coreset-shard", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if os.environ.get("SPOTDIFF_QUIET"):
            from spotdiff.progress import set_quiet

            set_quiet(True)
        print(json.dumps(CHILDREN[args.child](args)))
        return
    configs = args.configs.split(",")
    make_data(args, max(args.images, args.coreset_images))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_start": os.getloadavg(),
        "torch": torch.__version__,
        "machine": f"{os.cpu_count()}-core {platform.machine()}",
        "args": vars(args),
    }
    for name in ("padim", "patchcore"):
        if name in configs:
            results[f"{name}_floor"] = run_child("floor", args, config=name, images=args.images)
            results[name] = run_child("fit", args, config=name, images=args.images)
            print(report(results), file=sys.stderr, flush=True)
    if args.anomalib_python:
        for n in [int(x) for x in (args.anomalib_images or str(args.images)).split(",")]:
            if n == args.images and "padim" in results:
                results[f"padim_for_anomalib_{n}"] = results["padim"]
            else:
                results[f"padim_for_anomalib_{n}"] = run_child("fit", args, config="padim", images=n)
            results[f"anomalib_{n}"] = run_anomalib(args, n)
            print(report(results), file=sys.stderr, flush=True)
    if "coreset" in configs:
        n = args.coreset_images
        patches = n * (args.image_size // 8) ** 2
        results["coreset_exact"] = run_child("fit", args, config="patchcore", images=n, coreset_shard=0)
        if patches > DEFAULT_CORESET_SHARD:
            results["coreset_default"] = run_child("fit", args, config="patchcore", images=n)
            print(report(results), file=sys.stderr, flush=True)
        results["coreset_sharded"] = run_child(
            "fit", args, config="patchcore", images=n, coreset_shard=max(1, patches // 4)
        )
    if "accuracy" in configs:
        results["accuracy"] = run_child("accuracy", args)
    results["load_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print(report(results))


if __name__ == "__main__":
    main()
