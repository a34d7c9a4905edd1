"""Run the docs/deploy.md walk-through on synthetic data and save one overlay as docs/figures/deploy_overlay.png.

Plain folders are made from the synthetic ``cashew_synth`` object (good images, bad images and
their masks); then the commands of docs/deploy.md run as written: fit with an F1 threshold,
test, export to ONNX, predict with onnxruntime writing masks and overlays. The figure shows a
bad image that was used neither for fitting nor for calibration: predict's overlay (the original
beside its heat map, the defect outline, the colour bar with both thresholds, score and decision). Random-init ResNet-18, 128 px: a few minutes on one CPU core.

Usage (from the repository root)::

    PYTHONPATH=src python docs/figures/make_deploy_overlay.py [--work /tmp/deploy-demo]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

from spotdiff.cli import main
from spotdiff.data.synth import generate

HERE = Path(__file__).resolve().parent


def run(*argv: str) -> None:
    print("$ spotdiff", " ".join(argv), flush=True)
    if main(["--quiet", *argv]) != 0:
        raise SystemExit(f"spotdiff {argv[0]} failed")


def make_folders(work: Path) -> Path:
    """``good/`` (normal), ``val_bad/``, ``bad/`` (anomalous) and ``masks/`` from cashew_synth."""
    data = generate(work / "synth", seed=0, scale=0.5, image_size=128, objects=["cashew_synth"]) / "cashew_synth" / "Data"
    line = work / "line"
    shutil.rmtree(line, ignore_errors=True)
    for name in ("good", "val_bad", "bad", "masks"):
        (line / name).mkdir(parents=True)
    for image in sorted((data / "Images" / "Normal").iterdir()):
        shutil.copy(image, line / "good" / image.name)
    anomalies = sorted((data / "Images" / "Anomaly").iterdir())
    for i, image in enumerate(anomalies):
        shutil.copy(image, line / ("val_bad" if i % 2 == 0 else "bad") / image.name)
        shutil.copy(data / "Masks" / "Anomaly" / f"{image.stem}.png", line / "masks" / f"{image.stem}.png")
    return line


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spotdiff-deploy-demo"))
    args = parser.parse_args()
    line = make_folders(args.work)
    model, onnx_file, out = args.work / "model", args.work / "model.onnx", args.work / "predictions"
    masks_bad = args.work / "masks_bad"
    shutil.rmtree(masks_bad, ignore_errors=True)
    masks_bad.mkdir()
    masks_val = args.work / "masks_val"
    shutil.rmtree(masks_val, ignore_errors=True)
    masks_val.mkdir()
    for mask in (line / "masks").iterdir():
        target = masks_val if (line / "val_bad" / f"{mask.stem}.JPG").exists() else masks_bad
        shutil.copy(mask, target / mask.name)
    run("fit", "--model", "padim", "--arch", "resnet18", "--image-size", "128", "--train", str(line / "good"),
        "--val-bad", str(line / "val_bad"), "--val-masks", str(masks_val), "--mask-threshold", "0",
        "--threshold-mode", "f1",  # the synthetic masks hold defect-class ids, as VisA's do
        "--out", str(model))
    run("export", str(model), "--format", "onnx", "--out", str(onnx_file))
    run("predict", str(model), str(line / "bad"), "--backend", "onnxruntime", "--onnx", str(onnx_file),
        "--masks", "--out", str(out))
    rows = (out / "scores.csv").read_text().splitlines()
    print("\n".join(rows[:4]))
    header = rows[0].split(",")
    records = [dict(zip(header, r.split(","))) for r in rows[1:]]
    pick = max(records, key=lambda r: float(r["score"]))  # the most anomalous held-out bad image
    # predict's overlay already shows the original beside its heat map, colour bar and decision
    with Image.open(pick["overlay"]) as ov:
        figure = ov.convert("RGB")
    target = HERE / "deploy_overlay.png"
    figure.save(target, optimize=True)
    print(f"{target} ({target.stat().st_size // 1024} KB) from {pick['path']}: score {float(pick['score']):.3f}, "
          f"normalised {pick['normalized_score']}, decision {pick['decision']}")


if __name__ == "__main__":
    main_()
