"""``predict --backend onnxruntime`` never imports torch: the probe record, decoding and the whole command.

The command is run in a subprocess whose import system refuses torch and torchvision, so a torch
import anywhere on its path fails the test. One export (a few seconds): slow.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from PIL import Image  # noqa: E402

from spotdiff.detect import PaDiM, fit_folder, store  # noqa: E402
from spotdiff.detect.export import export_onnx  # noqa: E402
from spotdiff.detect.onnx_runtime import DEFAULT_BATCH, OnnxDetector  # noqa: E402
from spotdiff.detect.probe import PROBE_IMAGES, probe_images, probe_mismatch  # noqa: E402
from spotdiff.errors import WeightsError  # noqa: E402
from spotdiff.files import sha256_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = ROOT.parent / "shared" / "realdata" / "magnetic_tile"
SIZE = 32
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"{name}: blocked by the test (this command must not import torch)")
sys.meta_path.insert(0, _NoTorch())
from spotdiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_without_torch(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model dir, ONNX file, image folder): a calibrated PaDiM (resnet18, random init, 32 px)."""
    root = tmp_path_factory.mktemp("torchfree")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):  # not the model's size: resized
        Image.fromarray(rng.integers(0, 256, (SIZE + 7, SIZE + 5, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
    model = PaDiM(arch="resnet18", d=16, layers=["layer1", "layer2"])
    fit_folder(model, images, image_size=SIZE)
    model_dir = model.save(root / "padim")
    return model_dir, export_onnx(model_dir, root / "padim.onnx"), images


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_predict_with_onnxruntime_runs_without_torch(exported, tmp_path):
    model_dir, graph, images = exported
    out, ref = tmp_path / "ort", tmp_path / "torch"
    done = run_without_torch(
        "--quiet", "predict", str(model_dir), str(images), "--out", str(out), "--masks",
        "--backend", "onnxruntime", "--onnx", str(graph),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "blocked by the test" not in done.stderr
    ort_rows = read_rows(out / "scores.csv")
    assert len(ort_rows) == 10 and all(r["decision"] in ("normal", "anomalous") for r in ort_rows.values())
    assert all(Path(r["overlay"]).is_file() and Path(r["mask"]).is_file() for r in ort_rows.values())
    # the torch backend on the same files: the same decoding, so the graph's own parity (1e-4)
    from spotdiff.cli import main

    assert main(["--quiet", "predict", str(model_dir), str(images), "--out", str(ref), "--masks"]) == 0
    torch_rows = read_rows(ref / "scores.csv")
    assert torch_rows.keys() == ort_rows.keys()
    for path, row in torch_rows.items():
        assert float(ort_rows[path]["score"]) == pytest.approx(float(row["score"]), rel=1e-4)
        threshold = float(row["threshold"])  # calibrated on these images: one may score at the threshold itself
        if abs(float(row["score"]) - threshold) > 1e-4 * threshold:
            assert ort_rows[path]["decision"] == row["decision"]


@pytest.mark.slow
def test_the_probe_record_binds_the_graph_to_the_model(exported, tmp_path):
    model_dir, graph, _ = exported
    manifest = json.loads((model_dir / store.MANIFEST_FILE).read_text())
    assert store.PROBE_FILE in manifest["files"]
    runner = OnnxDetector(model_dir, graph)  # checked against the record, without torch
    assert runner.forward_batch == DEFAULT_BATCH
    scores, maps = runner.predict(probe_images(runner.image_size_))
    assert scores.shape == (PROBE_IMAGES,) and maps.shape == (PROBE_IMAGES, SIZE, SIZE)
    from safetensors.numpy import load_file

    record = load_file(str(model_dir / store.PROBE_FILE))
    assert probe_mismatch(scores, maps, record) is None
    assert "maps" in (probe_mismatch(scores, maps * 1.01, record) or "")  # the check is not vacuous
    assert probe_mismatch(scores, np.full_like(maps, np.nan), record)  # NaN never matches
    with pytest.raises(Exception, match="expects"):
        runner.predict(np.zeros((1, 3, SIZE + 1, SIZE), np.float32))


@pytest.mark.slow
def test_a_model_dir_without_probe_record_is_checked_with_torch(exported, tmp_path, caplog):
    """A directory saved before probe records existed: same acceptance, through the torch detector."""
    import shutil

    model_dir, graph, _ = exported
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    (old / store.PROBE_FILE).unlink()
    manifest = json.loads((old / store.MANIFEST_FILE).read_text())
    del manifest["files"][store.PROBE_FILE]
    (old / store.MANIFEST_FILE).write_text(json.dumps(manifest))
    with caplog.at_level("INFO", logger="spotdiff"):
        OnnxDetector(old, graph)
    assert "imports torch" in caplog.text and store.PROBE_FILE in caplog.text
    # a changed probe record is refused by the manifest's hash
    tampered = tmp_path / "tampered"
    shutil.copytree(model_dir, tampered)
    with open(tampered / store.PROBE_FILE, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x7f")  # the last float becomes +inf
    with pytest.raises(WeightsError, match="SHA-256 does not match"):
        OnnxDetector(tampered, graph)
    # ...and one whose hash was re-computed to match is refused by the probe run
    manifest = json.loads((tampered / store.MANIFEST_FILE).read_text())
    manifest["files"][store.PROBE_FILE] = sha256_file(tampered / store.PROBE_FILE)
    (tampered / store.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="does not compute what the model"):
        OnnxDetector(tampered, graph)


def test_probe_images_are_a_fixed_function_of_the_size():
    a, b = probe_images((5, 7)), probe_images((5, 7))
    assert a.shape == (PROBE_IMAGES, 3, 5, 7) and a.dtype == np.float32 and np.array_equal(a, b)
    assert 0.0 <= a.min() and a.max() < 1.0 and 0.3 < a.mean() < 0.7
    assert float(a.reshape(-1)[0]) == pytest.approx(0.5245520, abs=1e-6)  # pinned: records depend on it


def test_default_batch_is_the_detectors_cpu_batch():
    from spotdiff.detect.base import CPU_FORWARD_IMAGES

    assert DEFAULT_BATCH == CPU_FORWARD_IMAGES


def test_both_back_ends_decode_identically_within_one_grey_level_of_torchvision():
    """The one decoder (Pillow's antialiased bilinear on 8 bits) as a tensor and as an array, down- and
    upscaling, and its distance to torchvision's uint8 resize (what spotdiff used before)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from spotdiff.data.io import image_to_array, load_image
    from spotdiff.data.transforms import image_to_tensor

    paths = sorted(MAGNETIC_TILE.glob("MT_Blowhole/Imgs/*.jpg"))[:3]
    images = [load_image(p) for p in paths]
    rng = np.random.default_rng(0)
    images.append(Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)))
    for image in images:
        for size in [(64, 64), (256, 200), (37, 53)]:
            ours = image_to_array(image, size)
            assert ours.shape == (3, *size) and ours.dtype == np.float32 and ours.flags.c_contiguous
            assert np.array_equal(image_to_tensor(image, size).numpy(), ours)
            tv = F.resize(F.pil_to_tensor(image), list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
            assert np.abs(ours * 255 - tv.numpy()).max() <= 1.0 + 1e-4


def test_the_torch_free_modules_import_no_torch():
    code = (
        "import sys, spotdiff.cli, spotdiff.detect.predict, spotdiff.detect.onnx_runtime, spotdiff.data.io, "
        "spotdiff.data.listing, spotdiff.data.loader, spotdiff.detect.store, spotdiff.threads as t; "
        "t.apply_threads(1, torch=False); assert t.session_threads() == 1; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
