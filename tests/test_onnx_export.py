"""ONNX export of whole detectors and onnxruntime parity with the torch path (synthetic and real images).

Every export runs torch's dynamo exporter (about 5-10 s each on one core), hence the slow marks.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from detect_fakes import as_dataset, square_images  # noqa: E402

from spotdiff.cli import main  # noqa: E402
from spotdiff.detect import PaDiM, PatchCore  # noqa: E402
from spotdiff.detect import export as export_mod  # noqa: E402
from spotdiff.detect.export import export_onnx  # noqa: E402
from spotdiff.detect.onnx_runtime import OnnxDetector  # noqa: E402
from spotdiff.errors import WeightsError  # noqa: E402

MAGNETIC_TILE = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "magnetic_tile"
RTOL = 1e-4
SIZE = 48
pytestmark = pytest.mark.slow


def max_relative(a: torch.Tensor | np.ndarray, b: torch.Tensor) -> float:
    """Largest ``|a - b| / |b|`` over all elements (maps and scores are positive); ``a`` may be the
    onnxruntime runner's numpy array."""
    return float(((torch.as_tensor(a) - b).abs() / b.abs().clamp_min(1e-12)).max())


def make_models(tmp, train, target_dim=None):
    """PaDiM and PatchCore (resnet18, random init) fitted on ``train``, saved and exported: name -> (model, dir, onnx)."""
    models = {
        "padim": PaDiM(arch="resnet18", d=24, layers=["layer1", "layer2"]),
        "patchcore": PatchCore(arch="resnet18", coreset_ratio=0.25, num_neighbors=3, target_dim=target_dim),
    }
    out = {}
    for name, model in models.items():
        model.fit(train).save(tmp / name)
        out[name] = (model, tmp / name, export_onnx(tmp / name, tmp / f"{name}.onnx"))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    # PatchCore with channel reduction here (exported as a pooling matrix), without it on the magnetic tiles
    return make_models(tmp_path_factory.mktemp("onnx"), as_dataset(square_images(8, SIZE, seed=1)), target_dim=100)


@pytest.mark.parametrize("name", ["padim", "patchcore"])
@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_equals_torch_on_synthetic_images(exported, name, batch):
    model, mdir, onnx_file = exported[name]
    images = torch.cat([square_images(3, SIZE, seed=7), square_images(3, SIZE, defect=True, seed=8)])[:batch]
    runner = OnnxDetector(mdir, onnx_file, batch_size=batch)  # the graph was traced with batch 2
    torch_scores, torch_maps = model.predict(images)
    ort_scores, ort_maps = runner.predict(images)
    assert ort_maps.shape == torch_maps.shape == (batch, SIZE, SIZE)
    assert max_relative(ort_maps, torch_maps) < RTOL
    assert max_relative(ort_scores, torch_scores) < RTOL


def test_external_data_above_the_protobuf_limit(exported, tmp_path, monkeypatch):
    model, mdir, _ = exported["padim"]
    monkeypatch.setattr(export_mod, "PROTOBUF_LIMIT", 1024)  # as if the tensors exceeded 2 GB
    out = export_onnx(mdir, tmp_path / "big.onnx")
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and data.stat().st_size > 5 * out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]  # nothing else left
    images = square_images(2, SIZE, defect=True, seed=9)
    assert max_relative(OnnxDetector(mdir, out).predict(images)[1], model.predict(images)[1]) < RTOL


def read_csv(path):
    with open(path, newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def test_cli_export_and_predict_with_onnxruntime(exported, tmp_path, capsys):
    from PIL import Image

    _, mdir, _ = exported["patchcore"]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(torch.cat([square_images(2, SIZE, seed=3), square_images(2, SIZE, defect=True, seed=4)])):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    onnx_file = tmp_path / "pc.onnx"
    assert main(["--quiet", "export", str(mdir), "--format", "onnx", "--out", str(onnx_file)]) == 0
    assert main(["--quiet", "predict", str(mdir), str(folder), "--out", str(tmp_path / "t"), "--threshold", "1"]) == 0
    assert (
        main(
            [
                "--quiet",
                "predict",
                str(mdir),
                str(folder),
                "--out",
                str(tmp_path / "o"),
                "--threshold",
                "1",
                "--backend",
                "onnxruntime",
                "--onnx",
                str(onnx_file),
            ]
        )
        == 0
    )
    torch_rows, ort_rows = read_csv(tmp_path / "t" / "scores.csv"), read_csv(tmp_path / "o" / "scores.csv")
    assert torch_rows.keys() == ort_rows.keys() and len(torch_rows) == 4
    for path, row in torch_rows.items():
        assert float(ort_rows[path]["score"]) == pytest.approx(float(row["score"]), rel=RTOL)
        assert ort_rows[path]["decision"] == row["decision"]


def test_onnx_file_not_matching_its_model_is_refused(exported, tmp_path, capsys):
    _, padim_dir, padim_onnx = exported["padim"]
    _, patchcore_dir, _ = exported["patchcore"]
    images = tmp_path / "imgs"
    images.mkdir()
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file")
    cases = [
        (padim_onnx, patchcore_dir, f"{padim_onnx}: was not exported from the model in {patchcore_dir}"),
        (garbage, padim_dir, f"{garbage}: not a readable ONNX model"),
        (tmp_path / "missing.onnx", padim_dir, "missing.onnx: ONNX file not found"),
    ]
    for onnx_file, mdir, expected in cases:
        out = tmp_path / "out"
        assert (
            main(
                [
                    "predict",
                    str(mdir),
                    str(images),
                    "--out",
                    str(out),
                    "--backend",
                    "onnxruntime",
                    "--onnx",
                    str(onnx_file),
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
        assert not out.exists()
    with pytest.raises(WeightsError):
        OnnxDetector(padim_dir, garbage)


def test_onnxruntime_equals_torch_on_magnetic_tile_images(tmp_path):
    """Real grayscale tiles (../shared/realdata/magnetic_tile), 64 px: 8 normal train, 2 normal + 2 defect test."""
    if not (MAGNETIC_TILE / "MT_Free" / "Imgs").is_dir():
        pytest.skip(f"magnetic-tile dataset not found at {MAGNETIC_TILE}")
    from spotdiff.data import open_magnetic_tile

    train = open_magnetic_tile(MAGNETIC_TILE, "train", image_size=64)
    train = train.subset(list(range(8)))
    test = open_magnetic_tile(MAGNETIC_TILE, "test", image_size=64)
    labels = np.array(test.labels)
    picks = [*np.flatnonzero(labels == 0)[:2], *np.flatnonzero(labels == 1)[:2]]
    images = torch.stack([test[int(i)]["image"] for i in picks])
    for name, (model, mdir, onnx_file) in make_models(tmp_path, train).items():
        runner = OnnxDetector(mdir, onnx_file)
        torch_scores, torch_maps = model.predict(images)
        ort_scores, ort_maps = runner.predict(images)
        assert max_relative(ort_maps, torch_maps) < RTOL, name
        assert max_relative(ort_scores, torch_scores) < RTOL, name
