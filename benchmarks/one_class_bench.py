"""spotdiff PaDiM / PatchCore against anomalib 2.7 on the same images, backbone and settings.

Run (anomalib lives in its own venv, see docs/detect.md):

    PYTHONPATH=src .venv/bin/python benchmarks/one_class_bench.py \
        --anomalib-python /tmp/anomalib-venv/bin/python --n-train 64 --out benchmarks/results_detect.md

What is compared (every run in its own subprocess, so peak memory is per run):

* PaDiM fit + test, both driven by the same plain loop over the same uint8 image arrays
  (memory-mapped, normalised per batch): spotdiff ``PaDiM.fit/predict`` vs anomalib's
  ``PadimModel`` (train-mode forward into its memory bank, ``fit()``, eval-mode forward). Same
  random-init backbone (one safetensors file loaded by both), same layers, same channel subset
  (anomalib's ``idx`` buffer is overwritten with ours), same resolution and batch size.
  Reported: wall time, peak RSS above the RSS before fitting, image / pixel AU-ROC.
* Memory flatness: spotdiff PaDiM on N and on 4N training images (the N images repeated).
* PatchCore coreset selection on the same bank of training patch features, in one process:
  spotdiff ``greedy_coreset`` vs anomalib ``KCenterGreedy`` (same ratio and bank size).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["layer1", "layer2", "layer3"]
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def clocks() -> tuple[float, float]:
    """(wall, process CPU) seconds. CPU time is the robust measure on a shared, overloaded machine."""
    return time.perf_counter(), time.process_time()


def reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0) so the peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------------- data
def build_data(work: Path, image_size: int, n_train: int, seed: int, mults: list[int]) -> dict:
    """Write train/test uint8 arrays from the synthetic VisA-format dataset (object pcb_synth)."""
    sys.path.insert(0, str(ROOT / "src"))
    from spotdiff.data import open_dataset
    from spotdiff.data.synth import generate

    obj = "cashew_synth"
    root = generate(work / "synth", seed=seed, scale=1.0, image_size=image_size, objects=[obj])
    train = open_dataset(root, obj, split="1cls", subset="train", image_size=image_size)
    test = open_dataset(root, obj, split="1cls", subset="test", image_size=image_size)

    def to_u8(t):
        return np.clip(np.round(t.numpy() * 255.0), 0, 255).astype(np.uint8)

    train_imgs = np.stack([to_u8(train[i]["image"]) for i in range(len(train))])
    reps = -(-n_train // len(train_imgs))
    train_imgs = np.concatenate([train_imgs] * reps)[:n_train]
    items = [test[i] for i in range(len(test))]
    np.save(work / "test_images.npy", np.stack([to_u8(it["image"]) for it in items]))
    np.save(work / "test_labels.npy", np.array([it["label"] for it in items], dtype=np.int64))
    np.save(work / "test_masks.npy", np.stack([it["mask"].numpy() > 0.5 for it in items]).astype(np.uint8))
    for mult in sorted({1, *mults}):
        np.save(work / f"train_{mult}.npy", np.concatenate([train_imgs] * mult))
    return {
        "object": obj,
        "n_train_unique": len(train),
        "n_test": len(items),
        "n_test_anomalous": int(sum(it["label"] for it in items)),
    }


def prepare_backbone(work: Path, arch: str, d: int, seed: int) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from safetensors.torch import save_file

    from spotdiff.detect.padim import channel_subset
    from spotdiff.models import build_backbone

    torch.manual_seed(seed)
    save_file(
        {k: v.contiguous() for k, v in build_backbone(arch).state_dict().items()}, str(work / "backbone.safetensors")
    )
    np.save(work / "channel_index.npy", channel_subset(arch, LAYERS, d, seed)[1].numpy())


class ImageFile:
    """uint8 ``(N, 3, H, W)`` images in a ``.npy`` file, read by ``pread`` (no mapping stays resident,
    so reading 4x more images does not raise the reader's RSS)."""

    def __init__(self, path: Path) -> None:
        arr = np.load(path, mmap_mode="r")
        self.shape, self.offset = arr.shape, arr.offset
        self.item_bytes = int(np.prod(self.shape[1:]))
        del arr
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, len(self))
        buf = os.pread(self.fd, (stop - start) * self.item_bytes, self.offset + start * self.item_bytes)
        return np.frombuffer(buf, dtype=np.uint8).reshape(stop - start, *self.shape[1:])


def batches(images: ImageFile, size: int):
    import torch

    for i in range(0, len(images), size):
        yield torch.from_numpy(images.read(i, i + size).copy()).float().div_(255.0)


# ----------------------------------------------------------------------------------- children
def child_padim_ours(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from torch.utils.data import Dataset

    from spotdiff.detect import PaDiM

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    train = ImageFile(work / f"train_{args.mult}.npy")
    test = ImageFile(work / "test_images.npy")

    class ArrayDataset(Dataset):
        def __len__(self) -> int:
            return len(train)

        def __getitem__(self, i: int) -> dict:
            return {"image": torch.from_numpy(train.read(i, i + 1)[0].copy()).float().div_(255.0)}

    model = PaDiM(
        args.arch,
        weights=work / "backbone.safetensors",
        layers=LAYERS,
        d=args.d,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    assert np.array_equal(model.channel_index_.numpy(), np.load(work / "channel_index.npy"))
    base = rss_mb()
    reset_peak()
    t0 = clocks()
    model.fit(ArrayDataset())
    t1 = clocks()
    scores, maps = [], []
    for x in batches(test, args.batch_size):
        s, m = model.predict(x)
        scores.append(s.numpy())
        maps.append(m.numpy().astype(np.float16))
    t2 = clocks()
    return finish(args, base, t0, t1, t2, scores, maps)


def child_padim_anomalib(args: argparse.Namespace) -> dict:
    import torch
    from anomalib.models.image.padim.torch_model import PadimModel
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    train = ImageFile(work / f"train_{args.mult}.npy")
    test = ImageFile(work / "test_images.npy")
    model = PadimModel(backbone=args.arch, layers=LAYERS, pre_trained=False, n_features=args.d)
    state = {k: v for k, v in load_file(str(work / "backbone.safetensors")).items() if not k.startswith("fc.")}
    missing, _ = model.feature_extractor.feature_extractor.load_state_dict(state, strict=False)
    assert not missing, missing
    model.idx.copy_(torch.from_numpy(np.load(work / "channel_index.npy")))
    mean, std = torch.from_numpy(MEAN), torch.from_numpy(STD)
    base = rss_mb()
    reset_peak()
    t0 = clocks()
    model.train()
    for x in batches(train, args.batch_size):
        model((x - mean) / std)
    model.fit()
    t1 = clocks()
    model.eval()
    scores, maps = [], []
    with torch.no_grad():
        for x in batches(test, args.batch_size):
            out = model((x - mean) / std)
            scores.append(out.pred_score.numpy())
            maps.append(out.anomaly_map[:, 0].numpy().astype(np.float16))
    t2 = clocks()
    return finish(args, base, t0, t1, t2, scores, maps)


def finish(args, base, t0, t1, t2, scores, maps) -> dict:
    work = Path(args.work)
    np.save(work / f"scores_{args.child}_{args.mult}.npy", np.concatenate(scores))
    np.save(work / f"maps_{args.child}_{args.mult}.npy", np.concatenate(maps))
    return {
        "fit_s": t1[0] - t0[0],
        "test_s": t2[0] - t1[0],
        "fit_cpu_s": t1[1] - t0[1],
        "test_cpu_s": t2[1] - t1[1],
        "rss_before_mb": base,
        "peak_rss_mb": vm_hwm_mb(),
        "peak_above_base_mb": vm_hwm_mb() - base,
    }


def child_coreset(args: argparse.Namespace) -> dict:
    """Same bank, both selectors, in one process (anomalib venv + our sources on the path)."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from anomalib.models.components.sampling.k_center_greedy import KCenterGreedy
    from sklearn.random_projection import johnson_lindenstrauss_min_dim

    from spotdiff.detect import PatchCore
    from spotdiff.detect.patchcore import greedy_coreset

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    train = ImageFile(work / "train_1.npy")
    train.shape = (min(args.coreset_images, len(train)), *train.shape[1:])
    model = PatchCore(args.arch, weights=work / "backbone.safetensors", seed=args.seed)
    with torch.inference_mode():
        from spotdiff.data.transforms import normalize

        bank = torch.cat(
            [
                model._embed(normalize(x)).reshape(-1, 384 if args.arch == "resnet18" else 1536)
                for x in batches(train, args.batch_size)
            ]
        )
    n_select = int(bank.shape[0] * args.coreset_ratio)
    jl_dim = int(johnson_lindenstrauss_min_dim(bank.shape[0], eps=0.9))
    out = {"bank": list(bank.shape), "n_select": n_select, "anomalib_projection_dim": jl_dim}
    torch.manual_seed(args.seed)
    t = clocks()
    KCenterGreedy(bank, args.coreset_ratio).select_coreset_idxs()
    out["anomalib_s"], out["anomalib_cpu_s"] = (b - a for a, b in zip(t, clocks(), strict=True))
    for dim in (128, min(jl_dim, bank.shape[1])):
        t = clocks()
        greedy_coreset(bank, n_select, projection_dim=dim, seed=args.seed)
        out[f"ours_dim{dim}_s"], out[f"ours_dim{dim}_cpu_s"] = (b - a for a, b in zip(t, clocks(), strict=True))
    return out


def write_folder(work: Path) -> Path:
    """The benchmark images as PNG files in an MVTec-style folder (read by both end-to-end runs)."""
    from PIL import Image

    root = work / "folder" / "cashew_synth"
    if root.is_dir():
        return root.parent
    train = np.load(work / "train_1.npy")
    test, labels, masks = (np.load(work / f"test_{k}.npy") for k in ("images", "labels", "masks"))
    for sub in ("train/good", "test/good", "test/bad", "ground_truth/bad"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(train):
        Image.fromarray(img.transpose(1, 2, 0)).save(root / "train/good" / f"{i:03d}.png")
    for i, (img, label, mask) in enumerate(zip(test, labels, masks, strict=True)):
        Image.fromarray(img.transpose(1, 2, 0)).save(root / ("test/bad" if label else "test/good") / f"{i:03d}.png")
        if label:
            Image.fromarray(mask * 255).save(root / "ground_truth/bad" / f"{i:03d}_mask.png")
    return root.parent


def child_e2e_ours(args: argparse.Namespace) -> dict:
    """spotdiff's user path: open_dataset -> PaDiM.fit -> evaluate_detector (= `spotdiff fit` + `spotdiff test`)."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from spotdiff.data import open_dataset
    from spotdiff.detect import PaDiM
    from spotdiff.detect.evaluate import evaluate_detector

    torch.set_num_threads(args.threads)
    root = Path(args.work) / "folder"
    model = PaDiM(
        args.arch,
        weights=Path(args.work) / "backbone.safetensors",
        layers=LAYERS,
        d=args.d,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    base = rss_mb()
    reset_peak()
    t0 = clocks()
    model.fit(open_dataset(root, "cashew_synth", subset="train", image_size=256))
    metrics = evaluate_detector(model, open_dataset(root, "cashew_synth", subset="test", image_size=256))[0]
    t1 = clocks()
    return {
        "wall_s": t1[0] - t0[0],
        "cpu_s": t1[1] - t0[1],
        "peak_above_base_mb": vm_hwm_mb() - base,
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
    }


def child_e2e_anomalib(args: argparse.Namespace) -> dict:
    """anomalib's user path: Folder datamodule + Padim + Engine.fit + Engine.test."""
    import logging

    import torch
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Padim
    from safetensors.torch import load_file

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    dm = Folder(
        name="cashew_synth",
        root=work / "folder" / "cashew_synth",
        normal_dir="train/good",
        abnormal_dir="test/bad",
        normal_test_dir="test/good",
        mask_dir="ground_truth/bad",
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=0,
        val_split_mode="same_as_test",
    )
    model = Padim(backbone=args.arch, layers=LAYERS, pre_trained=False, n_features=args.d, visualizer=False)
    state = {k: v for k, v in load_file(str(work / "backbone.safetensors")).items() if not k.startswith("fc.")}
    missing, _ = model.model.feature_extractor.feature_extractor.load_state_dict(state, strict=False)
    assert not missing, missing
    model.model.idx.copy_(torch.from_numpy(np.load(work / "channel_index.npy")))
    engine = Engine(
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=work / "anomalib_results",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    base = rss_mb()
    reset_peak()
    t0 = clocks()
    engine.fit(model=model, datamodule=dm)
    results = engine.test(model=model, datamodule=dm, verbose=False)[0]
    t1 = clocks()
    return {
        "wall_s": t1[0] - t0[0],
        "cpu_s": t1[1] - t0[1],
        "peak_above_base_mb": vm_hwm_mb() - base,
        "image_auroc": float(results["image_AUROC"]),
        "pixel_auroc": float(results["pixel_AUROC"]),
    }


CHILDREN = {
    "padim-ours": child_padim_ours,
    "padim-anomalib": child_padim_anomalib,
    "coreset": child_coreset,
    "e2e-ours": child_e2e_ours,
    "e2e-anomalib": child_e2e_anomalib,
}


def run_child(python: str, name: str, args: argparse.Namespace, mult: int = 1) -> dict:
    cmd = [
        python,
        __file__,
        "--child",
        name,
        "--work",
        args.work,
        "--arch",
        args.arch,
        "--d",
        str(args.d),
        "--seed",
        str(args.seed),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--mult",
        str(mult),
        "--coreset-ratio",
        str(args.coreset_ratio),
        "--coreset-images",
        str(args.coreset_images),
    ]
    env = {**os.environ, "SPOTDIFF_QUIET": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name} x{mult}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def aurocs(work: Path, key: str) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    labels = np.load(work / "test_labels.npy")
    masks = np.load(work / "test_masks.npy")
    scores = np.load(work / f"scores_{key}.npy")
    maps = np.load(work / f"maps_{key}.npy").astype(np.float32)
    return roc_auc_score(labels, scores), roc_auc_score(masks.ravel(), maps.ravel())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=sorted(CHILDREN), default=None)
    p.add_argument("--work", default="/tmp/spotdiff-one-class-bench")
    p.add_argument("--anomalib-python", default="/tmp/anomalib-venv/bin/python")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--d", type=int, default=100)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1: robust on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    p.add_argument("--mult", type=int, default=1, help="(child) training set = the N images repeated this often")
    p.add_argument(
        "--mults",
        type=int,
        nargs="+",
        default=[1, 4, 12],
        help="training-set sizes to run, as multiples of --n-train (the first is the reference)",
    )
    p.add_argument("--coreset-images", type=int, default=32, help="training images whose patches form the bank")
    p.add_argument("--skip", nargs="*", default=[], choices=["anomalib", "coreset", "e2e"])
    p.add_argument("--out", default=None, help="markdown file to write the results to")
    args = p.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = build_data(work, args.image_size, args.n_train, args.seed, args.mults)
    prepare_backbone(work, args.arch, args.d, args.seed)
    ours_py = sys.executable
    res: dict = {
        "data": data,
        "settings": {
            k: getattr(args, k)
            for k in (
                "arch",
                "d",
                "image_size",
                "n_train",
                "batch_size",
                "threads",
                "seed",
                "coreset_ratio",
                "coreset_images",
                "mults",
            )
        },
    }
    sides = [("ours", ours_py)] + ([] if "anomalib" in args.skip else [("anomalib", args.anomalib_python)])
    for mult in args.mults:
        for side, python in sides:
            key = f"{side}_{mult}"
            res[key] = run_child(python, f"padim-{side}", args, mult)
            res[key]["image_auroc"], res[key]["pixel_auroc"] = aurocs(work, f"padim-{side}_{mult}")
    if "e2e" not in args.skip and "anomalib" not in args.skip:
        write_folder(work)
        res["e2e_ours"] = run_child(ours_py, "e2e-ours", args)
        res["e2e_anomalib"] = run_child(args.anomalib_python, "e2e-anomalib", args)
    if "coreset" not in args.skip and "anomalib" not in args.skip:
        res["coreset"] = run_child(args.anomalib_python, "coreset", args)
    import torch

    res["load_average"], res["torch_version"] = os.getloadavg()[0], torch.__version__
    write_json(work / "results.json", res)
    text = report(res)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def report(res: dict) -> str:
    s = res["settings"]
    n = s["n_train"]
    lines = [
        "# 1-class detection benchmark: spotdiff vs anomalib 2.7",
        "",
        f"Date {datetime.date.today().isoformat()}; machine: {os.cpu_count()}-core {platform.machine()} CPU, "
        f"1-minute load average {res['load_average']:.1f} at the end of the runs; Python "
        f"{platform.python_version()}, torch {res['torch_version']}; script `benchmarks/one_class_bench.py`. "
        "The ratios use **process CPU time** (1 torch thread per run, so CPU time = compute time, robust on a "
        "shared machine); wall times are shown too.",
        f"Data: synthetic `{res['data']['object']}` (spotdiff.data.synth, scale 1.0, generated at "
        f"{s['image_size']} px): {n} training images, {res['data']['n_test']} test images "
        f"({res['data']['n_test_anomalous']} anomalous). Backbone {s['arch']}, random init (seed {s['seed']}), one "
        f"safetensors file loaded by both; layers 1-3, d={s['d']}, the same channel subset; batch {s['batch_size']}.",
        "",
        "## PaDiM fit + test, same plain loop over the same arrays (each run its own process)",
        "",
        "| run | fit CPU s | test CPU s | fit+test CPU s | fit+test wall s | peak RSS above start (MB) "
        "| image AU-ROC | pixel AU-ROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mults = s["mults"]
    for mult in mults:
        for side in ("ours", "anomalib"):
            r = res.get(f"{side}_{mult}")
            if r is None:
                continue
            name = f"{'spotdiff' if side == 'ours' else 'anomalib'}, {n * mult} train"
            lines.append(
                f"| {name} | {r['fit_cpu_s']:.1f} | {r['test_cpu_s']:.1f} | "
                f"{r['fit_cpu_s'] + r['test_cpu_s']:.1f} | {r['fit_s'] + r['test_s']:.1f} | "
                f"{r['peak_above_base_mb']:.0f} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} |"
            )
    lines.append("")
    ref = res[f"ours_{mults[0]}"]
    for mult in mults[1:]:
        lines.append(
            f"- spotdiff peak memory, {n * mult} / {n * mults[0]} training images: "
            f"{res[f'ours_{mult}']['peak_above_base_mb'] / ref['peak_above_base_mb']:.2f} (target <= 1.2)"
        )
    for mult in mults:
        x, y = res[f"ours_{mult}"], res.get(f"anomalib_{mult}")
        if y is None:
            continue
        lines.append(
            f"- {n * mult} training images: CPU time spotdiff / anomalib "
            f"{(x['fit_cpu_s'] + x['test_cpu_s']) / (y['fit_cpu_s'] + y['test_cpu_s']):.2f} (target <= 0.5); "
            f"peak memory spotdiff / anomalib {x['peak_above_base_mb'] / y['peak_above_base_mb']:.2f} "
            f"(target <= 0.33); AU-ROC difference image {x['image_auroc'] - y['image_auroc']:+.4f}, "
            f"pixel {x['pixel_auroc'] - y['pixel_auroc']:+.4f} (target |diff| <= 0.01)"
        )
    if "e2e_ours" in res:
        eo, ea = res["e2e_ours"], res["e2e_anomalib"]
        lines += [
            "",
            "## PaDiM end to end, each library's user path (PNG folder, fit + test with metrics)",
            "",
            "spotdiff: `open_dataset` + `PaDiM.fit` + `evaluate_detector` (what `spotdiff fit` + `spotdiff test` "
            "run; exact image/pixel AU-ROC, AU-PR, AP and AU-PRO). anomalib: `Folder` datamodule "
            "(val = test) + `Padim` + `Engine.fit` + `Engine.test` (image/pixel AU-ROC and F1).",
            "",
            "| run | CPU s | wall s | peak RSS above start (MB) | image AU-ROC | pixel AU-ROC |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in (("spotdiff", eo), ("anomalib", ea)):
            lines.append(
                f"| {name} | {r['cpu_s']:.1f} | {r['wall_s']:.1f} | {r['peak_above_base_mb']:.0f} | "
                f"{r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} |"
            )
        lines += [
            "",
            f"- CPU time spotdiff / anomalib {eo['cpu_s'] / ea['cpu_s']:.2f}; peak memory "
            f"{eo['peak_above_base_mb'] / ea['peak_above_base_mb']:.2f}",
        ]
    if "coreset" in res:
        c = res["coreset"]
        lines += [
            "",
            "## PatchCore coreset selection (same bank, same process)",
            "",
            f"Bank of {c['bank'][0]} x {c['bank'][1]} patch features (layer2+3 of {s['coreset_images']} "
            "training images), "
            f"ratio {s['coreset_ratio']} -> {c['n_select']} centres. anomalib projects with a sparse random "
            f"projection to {c['anomalib_projection_dim']} dims (JL bound, eps 0.9).",
            "",
            "| selector | CPU s | wall s | speed-up (CPU) |",
            "|---|---|---|---|",
            f"| anomalib KCenterGreedy | {c['anomalib_cpu_s']:.1f} | {c['anomalib_s']:.1f} | 1.0 |",
        ]
        for k in c:
            if k.startswith("ours_dim") and k.endswith("_cpu_s"):
                dim = k[len("ours_dim") : -len("_cpu_s")]
                lines.append(
                    f"| spotdiff greedy_coreset, {dim}-dim projection | {c[k]:.1f} | "
                    f"{c[f'ours_dim{dim}_s']:.1f} | {c['anomalib_cpu_s'] / c[k]:.1f}x |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
