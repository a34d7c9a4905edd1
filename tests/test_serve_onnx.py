"""`spotdiff serve --backend onnxruntime` answers what `predict --backend onnxruntime` writes (one export: slow)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("fastapi")

from test_serve import client_for, fit_model_dir, post, sample_pngs

from spotdiff.cli import main
from spotdiff.detect.export import export_onnx
from spotdiff.serve import load_models

pytestmark = pytest.mark.slow


def test_onnxruntime_backend_scores_equal_predicts(tmp_path):
    model_dir = fit_model_dir(tmp_path / "padim")
    onnx = export_onnx(model_dir, tmp_path / "padim.onnx")
    folder = tmp_path / "in"
    folder.mkdir()
    for i, data in enumerate(sample_pngs()):
        (folder / f"img{i}.png").write_bytes(data)
    assert (
        main(
            [
                "--quiet",
                "predict",
                str(model_dir),
                str(folder),
                "--out",
                str(tmp_path / "out"),
                "--backend",
                "onnxruntime",
                "--onnx",
                str(onnx),
                "--batch-size",
                "1",
                "--no-overlays",
            ]
        )
        == 0
    )
    with open(tmp_path / "out" / "scores.csv", newline="") as fh:
        expected = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    models = load_models([f"station-3={model_dir}"], backend="onnxruntime", onnx_files=[str(onnx)])
    with client_for(model_dir, tmp_path, models=models) as client:
        assert client.get("/v1/models").json()["models"][0]["backend"] == "onnxruntime"
        for name, row in sorted(expected.items()):
            r = post(client, (folder / name).read_bytes(), name="station-3")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["score"] == float(row["score"]) and body["decision"] == row["decision"]
            assert body["normalized_score"] == float(row["normalized_score"])
            assert body["normal_percentile"] == float(row["normal_percentile"])
