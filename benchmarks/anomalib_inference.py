"""Inference side by side with anomalib on real-size images (issue 26, item 4).

The same full-size images, the same PaDiM (ResNet-18 random init, ``layer2`` + ``layer3``, d = 100,
256 px, the same channel subset and the same fitted statistics copied across), timed as a user runs
each library, one fresh process per arm, interleaved (arm A, B, C ... then the reverse order):

* spotdiff (this environment): ``spotdiff predict`` with torch and with onnxruntime, overlays
  off (``--no-overlays``) and on (overlays + ``--masks``);
* anomalib (``--anomalib-python``, an environment with anomalib 2.x beside the same torch; this
  file's ``--peer`` mode imports only torch, safetensors and anomalib): ``Engine.predict`` (its docs'
  recommended inference path) with its visualizer off and on, ``TorchInferencer`` (its deployment
  inferencer for a ``.pt`` export, called per image) and ``OpenVINOInferencer`` (called per image)
  on its OpenVINO export, the deployment path anomalib's docs recommend, twice: at OpenVINO's default
  inference precision (bf16 on a CPU with AVX512_BF16 or AMX, else f32) and forced to f32, spotdiff's
  precision.

The OpenVINO arms need anomalib's ``openvino`` extra in the anomalib environment
(``pip install "anomalib[openvino]==2.7.0"``: openvino, onnx, onnxscript, nncf). anomalib 2.7's
``Engine.export(..., ExportType.OPENVINO)`` goes through ``torch.onnx.export(dynamo=True)``, which
imports ``onnxscript``; without it the export fails with ``ModuleNotFoundError: ONNX export requires
the optional `onnxscript` dependency`` and the driver prints that and skips the arms.

Images/s is the command's whole wall time (interpreter start, imports, model load, every image),
as a production line would see a batch job; the arm's own loop time is given too where the arm
reports it. Peak memory: the RSS high-water mark of the arm's process (``os.wait4``). Same
computation: spotdiff's scores against anomalib's ``PadimModel`` (a) on identical input tensors
and (b) each on its own decoding / resizing of the files, (c) against anomalib's whole exported
module in torch (its pre-processor resizes with ``antialias=False``, spotdiff with antialias), and each
OpenVINO arm's scores against spotdiff's and against (c), which isolates the conversion's own error.

    PYTHONPATH=src python benchmarks/anomalib_inference.py --anomalib-python /work/anovenv/bin/python
    PYTHONPATH=src python benchmarks/anomalib_inference.py --arms OpenVINO --visa 0 --rounds 1  # a subset
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "magnetic_tile"
ARCH, LAYERS, D, SIZE = "resnet18", ["layer2", "layer3"], 100, 256
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- anomalib side (--peer)
def peer_model(work: Path, visualizer: bool) -> Any:
    """anomalib's ``Padim`` with spotdiff's backbone weights, channel subset and fitted statistics."""
    import torch
    from anomalib.models import Padim
    from safetensors.torch import load_file

    model = Padim(backbone=ARCH, layers=LAYERS, pre_trained=False, n_features=D, visualizer=visualizer, evaluator=False)
    extractor = model.model.feature_extractor.feature_extractor
    missing, _ = extractor.load_state_dict(load_file(str(work / "weights.safetensors")), strict=False)
    if missing:
        raise SystemExit(f"weights do not cover anomalib's extractor: missing {missing[:5]}")
    stats = load_file(str(work / "stats.safetensors"))
    model.model.idx = stats["channel_index"]
    model.model.gaussian.mean = stats["mean"]  # (d, P)
    model.model.gaussian.inv_covariance = stats["inv_covariance"]  # (P, d, d)
    if hasattr(model, "_is_fitted"):
        model._is_fitted = torch.tensor([True])
    model.eval()
    return model


def peer(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work, folder = args.work, args.folder
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    out: dict[str, Any] = {}
    if args.peer == "scores":  # raw PadimModel scores: (a) spotdiff's tensors, (b) anomalib's own decoding
        from anomalib.data.utils import read_image
        from safetensors.torch import load_file
        from torchvision.transforms.v2 import functional as F

        module = peer_model(work, False)
        model = module.model
        with torch.no_grad():
            x = load_file(str(work / "tensors.safetensors"))["images"]
            out["same_tensors"] = model(F.normalize(x, MEAN, STD)).pred_score.flatten().tolist()
            own, pipeline = [], []
            for p in paths:
                img = read_image(p, as_tensor=True)
                resized = F.resize(img, [SIZE, SIZE], antialias=True)
                own.append(float(model(F.normalize(resized[None], MEAN, STD)).pred_score.flatten()[0]))
                # the whole module as exported: its pre-processor (Resize without antialias, Normalize) included
                pipeline.append(float(module(img[None]).pred_score.flatten()[0]))
            out["own_decoding"], out["module"] = own, pipeline
        print(json.dumps(out))
        return
    if args.peer == "export":
        from anomalib.deploy import ExportType
        from anomalib.engine import Engine

        model = peer_model(work, False)
        engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=str(work / "anomalib"))
        out["torch"] = str(engine.export(model, ExportType.TORCH, export_root=str(work / "export")))
        try:
            import openvino  # noqa: F401

            out["openvino"] = str(engine.export(model, ExportType.OPENVINO, export_root=str(work / "export")))
        except Exception as exc:  # noqa: BLE001 - openvino missing or its export failing: that arm is skipped
            out["openvino"] = None
            out["openvino_error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(json.dumps(out))
        return
    start = time.perf_counter()
    if args.peer in ("engine", "engine_vis"):
        from anomalib.engine import Engine

        model = peer_model(work, args.peer == "engine_vis")
        root = Path(tempfile.mkdtemp(prefix="anomalib-predict-", dir=work))
        engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=str(root))
        loop = time.perf_counter()
        predictions = engine.predict(model=model, data_path=str(folder), return_predictions=True)
        n = sum(len(b.pred_score) for b in predictions or [])
    elif args.peer == "torch_inferencer":
        from anomalib.deploy import TorchInferencer

        inferencer = TorchInferencer(path=work / "export" / "weights" / "torch" / "model.pt", device="cpu")
        loop = time.perf_counter()
        n = 0
        for p in paths:
            inferencer.predict(p)
            n += 1
    elif args.peer in ("openvino_inferencer", "openvino_inferencer_f32"):
        from anomalib.deploy import OpenVINOInferencer

        config = {"INFERENCE_PRECISION_HINT": "f32"} if args.peer.endswith("_f32") else None
        xml = work / "export" / "weights" / "openvino" / "model.xml"
        inferencer = OpenVINOInferencer(path=xml, device="CPU", config=config)
        out["precision"] = inferencer.model.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        loop = time.perf_counter()
        n, scores = 0, []
        for p in paths:
            scores.append(float(inferencer.predict(p).pred_score.flatten()[0]))  # raw: post-processor not fitted
            n += 1
        out["scores"] = scores
    else:
        raise SystemExit(f"unknown peer arm {args.peer}")
    end = time.perf_counter()
    out.update(images=n, loop_s=end - loop, setup_s=loop - start)
    print(json.dumps(out))


# ----------------------------------------------------------------------------- spotdiff side (driver)
def synthetic(folder: Path, n: int, size: tuple[int, int], seed: int) -> Path:
    """``n`` textured JPEGs of ``size`` (H, W) with bright blobs: ``predict_bench.py``'s images."""
    from predict_bench import synthetic as predict_bench_images  # benchmarks/ is on sys.path as a script

    return predict_bench_images(folder, n, size, "jpg", seed)


def prepare(work: Path, train: list[Path], onnx: bool) -> None:
    """Fit spotdiff's PaDiM on ``train``, save it (and its ONNX export), and write what the peer copies."""
    from safetensors.torch import save_file

    from spotdiff.data.io import load_image
    from spotdiff.data.transforms import image_to_tensor
    from spotdiff.detect import PaDiM
    from spotdiff.detect.base import make_backbone
    from spotdiff.detect.calibration import calibrate
    from spotdiff.detect.export import export_onnx

    images = [{"image": image_to_tensor(load_image(p), SIZE)} for p in train]
    model = PaDiM(arch=ARCH, layers=LAYERS, d=D, weights=None, seed=0).fit(images[:-16])
    calibrate(model, images[-16:])
    model.save(work / "model")
    if onnx:
        export_onnx(work / "model", work / "model.onnx")
    save_file(
        {k: v.contiguous() for k, v in make_backbone(ARCH, None, 0).state_dict().items()},
        str(work / "weights.safetensors"),
    )
    linv = model.inv_chol_
    assert linv is not None and model.mean_ is not None
    inv_cov = (linv.transpose(1, 2) @ linv).contiguous()  # (P, d, d): (L L^T)^-1 = L^-T L^-1
    save_file(
        {"mean": model.mean_.T.contiguous(), "inv_covariance": inv_cov, "channel_index": model.channel_index_},
        str(work / "stats.safetensors"),
    )


def spawn(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run ``cmd`` (in ``cwd``) under ``/usr/bin/time``: wall s, CPU s, peak RSS bytes and its last JSON line.

    Through ``/usr/bin/time`` (a small process), because Linux keeps a process's RSS high-water
    mark across fork and exec: a child forked from this driver would report the driver's RSS."""
    with tempfile.NamedTemporaryFile("r") as stats:
        timed = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", stats.name, *cmd]
        done = subprocess.run(timed, capture_output=True, text=True, env=env, cwd=cwd)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:4])} ... exited {done.returncode}:\n{done.stderr[-3000:]}")
        wall, user, system, maxrss_kb = stats.read().split()[-4:]
    result: dict[str, Any] = {
        "wall_s": float(wall),
        "cpu_s": float(user) + float(system),
        "peak_rss": int(maxrss_kb) * 1024,
    }
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        result.update(json.loads(lines[-1]))
    return result


def main() -> None:
    global ARCH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anomalib-python", default="/work/anovenv/bin/python")
    ap.add_argument("--tiles", type=int, default=96, help="magnetic-tile test images (all defect classes + free)")
    ap.add_argument("--visa", type=int, default=48, help="1500x1000 synthetic JPEGs")
    ap.add_argument("--train", type=int, default=120, help="magnetic-tile normal images to fit on")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every arm")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arms", default="all", help="comma list of arm names (default all)")
    ap.add_argument("--arch", default=ARCH, choices=["resnet18", "wide_resnet50_2"], help="backbone of both sides")
    ap.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    ARCH = args.arch  # both sides (the peer gets --arch too)
    if args.peer:
        peer(args)
        return
    import torch

    from spotdiff.data.io import load_image
    from spotdiff.data.transforms import image_to_tensor
    from spotdiff.progress import set_quiet

    set_quiet(True)
    torch.set_num_threads(args.threads)
    print(
        f"# anomalib_inference: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}, threads {args.threads}, torch {torch.__version__}, {ARCH}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="anomalib_inference-"))
    try:
        free = sorted((REALDATA / "MT_Free" / "Imgs").glob("*.jpg"))
        train, rest = free[: args.train], free[args.train :]
        classes = [
            sorted((REALDATA / c / "Imgs").glob("*.jpg"))
            for c in sorted(os.listdir(REALDATA))
            if c.startswith("MT_") and c != "MT_Free"
        ]
        pool = [p for group in zip(*classes, rest, strict=False) for p in group]  # round robin over classes
        tiles = work / "tiles"
        tiles.mkdir()
        for i, p in enumerate(pool[: args.tiles]):
            shutil.copyfile(p, tiles / f"{i:04d}_{p.parent.parent.name}.jpg")
        sets = {"magnetic tile": tiles}
        if args.visa > 0:
            sets["1500x1000 JPEG"] = synthetic(work / "visa", args.visa, (1000, 1500), 1)
        prepare(work, train, onnx=True)
        export = json.loads(
            subprocess.run(
                [args.anomalib_python, __file__, "--arch", ARCH, "--peer", "export", "--work", str(work)]
                + ["--folder", str(tiles)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "TRUST_REMOTE_CODE": "1"},
            ).stdout.splitlines()[-1]
        )
        sd = [
            sys.executable,
            "-m",
            "spotdiff",
            "--quiet",
            "--threads",
            str(args.threads),
            "predict",
            str(work / "model"),
        ]
        peer_cmd = [args.anomalib_python, __file__, "--arch", ARCH, "--threads", str(args.threads), "--work", str(work)]
        arms: dict[str, Any] = {
            "spotdiff torch, no overlays": lambda f, o: sd + [str(f), "--out", o, "--no-overlays"],
            "spotdiff torch, overlays + masks": lambda f, o: sd + [str(f), "--out", o, "--masks"],
            "spotdiff onnxruntime, no overlays": lambda f, o: (
                sd
                + [str(f), "--out", o, "--no-overlays", "--backend", "onnxruntime", "--onnx", str(work / "model.onnx")]
            ),
            "spotdiff onnxruntime, overlays + masks": lambda f, o: (
                sd + [str(f), "--out", o, "--masks", "--backend", "onnxruntime", "--onnx", str(work / "model.onnx")]
            ),
            "anomalib Engine.predict, no visualizer": lambda f, o: peer_cmd + ["--peer", "engine", "--folder", str(f)],
            "anomalib Engine.predict, visualizer": lambda f, o: peer_cmd + ["--peer", "engine_vis", "--folder", str(f)],
            "anomalib TorchInferencer": lambda f, o: peer_cmd + ["--peer", "torch_inferencer", "--folder", str(f)],
        }
        if export.get("openvino_error"):
            print(f"# anomalib OpenVINO export failed, arm skipped: {export['openvino_error']}", flush=True)
        if export.get("openvino"):
            arms["anomalib OpenVINOInferencer, OpenVINO's default precision"] = lambda f, o: (
                peer_cmd + ["--peer", "openvino_inferencer", "--folder", str(f)]
            )
            arms["anomalib OpenVINOInferencer, f32"] = lambda f, o: (
                peer_cmd + ["--peer", "openvino_inferencer_f32", "--folder", str(f)]
            )
        if args.arms != "all":
            arms = {k: v for k, v in arms.items() if any(a.strip() in k for a in args.arms.split(","))}
        env = {**os.environ, "TRUST_REMOTE_CODE": "1"}
        env.pop("OMP_NUM_THREADS", None)
        # same computation: spotdiff's scores (torch arm, in process) against anomalib's PadimModel
        from spotdiff.detect import load_detector

        model = load_detector(work / "model")
        paths = sorted(tiles.iterdir())
        x = torch.stack([image_to_tensor(load_image(p), SIZE) for p in paths])
        from safetensors.torch import save_file

        save_file({"images": x.contiguous()}, str(work / "tensors.safetensors"))
        ours = model.predict(x)[0]
        theirs = spawn(peer_cmd + ["--peer", "scores", "--folder", str(tiles)], env)
        same = torch.tensor(theirs["same_tensors"])
        own = torch.tensor(theirs["own_decoding"])
        module = torch.tensor(theirs["module"])
        rel = lambda a: float(((a - ours).abs() / ours.abs()).max())  # noqa: E731
        corr = lambda a: float(torch.corrcoef(torch.stack([a, ours]))[0, 1])  # noqa: E731
        print(
            f"# same computation, {len(paths)} magnetic-tile images: max relative score difference "
            f"{rel(same):.2e} on identical tensors (correlation {corr(same):.6f}); {rel(own):.2e} with each "
            f"library's own decoding and resizing (correlation {corr(own):.4f}); {rel(module):.2e} against "
            f"anomalib's whole module (its pre-processor resizes without antialias; correlation {corr(module):.4f})",
            flush=True,
        )
        # anomalib's OpenVINOInferencer caches compiled models in ./openvino_cache: the anomalib arms run in
        # ``work`` (removed at the end), and this untimed run fills the cache as a deployment's first run would
        for arm in [a for a in arms if "OpenVINO" in a]:  # its scores on the tiles
            ov = spawn(arms[arm](tiles, str(work / "out")), env, cwd=work)
            got = torch.tensor(ov["scores"])
            print(
                f"# same computation, {arm} (inference precision {ov['precision']}): max relative score "
                f"difference {rel(got):.2e} against spotdiff (correlation {corr(got):.6f}), "
                f"{float(((got - module).abs() / module.abs()).max()):.2e} against the same anomalib module in torch",
                flush=True,
            )
        # spotdiff's two back ends on the same files: the onnxruntime command never imports torch; both decode
        # with the one decoder (data/io.py: image_to_array), so they differ only by the graph's arithmetic
        cli = {}
        for backend in ("torch", "onnxruntime"):
            arm = f"spotdiff {backend}, no overlays"
            if arm in arms:
                out = work / f"check-{backend}"
                spawn(arms[arm](tiles, str(out)), env)
                with open(out / "scores.csv", newline="") as fh:
                    cli[backend] = torch.tensor([float(r["score"]) for r in csv.DictReader(fh)])
        if len(cli) == 2:
            diff = float(((cli["onnxruntime"] - cli["torch"]).abs() / cli["torch"].abs()).max())
            print(
                f"# spotdiff predict, onnxruntime (torch-free) against torch, same files, "
                f"{len(paths)} magnetic-tile images: max relative score difference {diff:.2e}",
                flush=True,
            )
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        loads: dict[str, list[float]] = {}
        for name, folder in sets.items():
            n = len(list(folder.iterdir()))
            order = list(arms)
            for r in range(args.rounds):
                for arm in order if r % 2 == 0 else order[::-1]:
                    loads.setdefault(name, []).append(os.getloadavg()[0])
                    out = work / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    res = spawn(arms[arm](folder, str(out)), env, cwd=work if arm.startswith("anomalib") else None)
                    res["ips"] = n / res["wall_s"]
                    results.setdefault((name, arm), []).append(res)
                    print(
                        f"#   {name} | {arm} | {res['wall_s']:.1f} s | {res['peak_rss'] / 1e6:.0f} MB | load {loads[name][-1]:.1f}",
                        file=sys.stderr,
                        flush=True,
                    )
            best = {arm: max(results[(name, arm)], key=lambda r: r["ips"]) for arm in arms}
            ref = best.get("anomalib Engine.predict, no visualizer") or next(iter(best.values()))
            print(f"\n### {name}: {n} images, load average {min(loads[name]):.1f}-{max(loads[name]):.1f}\n")
            print(
                "| arm | images/s (whole command) | / anomalib Engine.predict | peak RSS MB | / anomalib | loop images/s | CPU s |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|")
            for arm, r in best.items():
                loop = f"{r['images'] / r['loop_s']:.1f}" if "loop_s" in r else ""
                print(
                    f"| {arm} | {r['ips']:.2f} | {r['ips'] / ref['ips']:.2f} | {r['peak_rss'] / 1e6:.0f} | "
                    f"{r['peak_rss'] / ref['peak_rss']:.2f} | {loop} | {r['cpu_s']:.1f} |",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
