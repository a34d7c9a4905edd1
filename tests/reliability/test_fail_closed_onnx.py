"""An ONNX file is bound to its model by content (issue 25, item 3), and export never writes into a model.

``predict --backend onnxruntime`` checks the model's fingerprint, the file's own content digest and a
probe run against the torch detector; metadata copied from another export, or re-computed after an
initialiser was changed, does not make a graph acceptable. Each export takes a few seconds: slow.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import numpy_helper
from reliability_helpers import noise_jpeg

from spotdiff.cli import main
from spotdiff.detect import PaDiM, PatchCore, fit_folder
from spotdiff.detect.export import export_onnx
from spotdiff.detect.onnx_runtime import CONTENT_KEY, OnnxDetector, graph_digest
from spotdiff.errors import WeightsError

pytestmark = pytest.mark.slow
SIZE = 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (model dir, ONNX file) for a PaDiM and a PatchCore (resnet18, random init, 32 px)."""
    root = tmp_path_factory.mktemp("onnx")
    images = root / "images"
    images.mkdir()
    for i in range(8):
        (images / f"{i}.jpg").write_bytes(noise_jpeg(i, SIZE))
    out = {}
    for name, model in (
        ("padim", PaDiM(arch="resnet18", d=16, layers=["layer1", "layer2"])),
        ("patchcore", PatchCore(arch="resnet18", coreset_ratio=0.5, num_neighbors=3)),
    ):
        fit_folder(model, images, image_size=SIZE)
        model_dir = model.save(root / name)
        out[name] = (model_dir, export_onnx(model_dir, root / f"{name}.onnx"))
    return out


def with_metadata(graph: Path, metadata: dict[str, str], dest: Path) -> Path:
    proto = onnx.load(str(graph))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(dest))
    return dest


def metadata_of(graph: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}


def zero_largest_initializer(graph: Path, dest: Path) -> Path:
    proto = onnx.load(str(graph))
    largest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    largest.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(largest)), largest.name))
    onnx.save(proto, str(dest))
    return dest


def rehashed(graph: Path) -> Path:
    """The attacker's best move: re-compute the recorded content digest of the edited file."""
    return with_metadata(graph, {**metadata_of(graph), CONTENT_KEY: graph_digest(graph)}, graph)


def test_exported_files_are_accepted(exported):
    for model_dir, graph in exported.values():
        OnnxDetector(model_dir, graph)


@pytest.mark.parametrize("attack", ["patchcore_graph_with_padim_metadata", "padim_graph_largest_initializer_zeroed"])
@pytest.mark.parametrize("rehash", [False, True])
def test_a_graph_that_is_not_the_models_is_refused(attack, rehash, exported, tmp_path, capsys):
    padim_dir, padim_graph = exported["padim"]
    _, patchcore_graph = exported["patchcore"]
    forged = tmp_path / "forged.onnx"
    if attack == "patchcore_graph_with_padim_metadata":
        with_metadata(patchcore_graph, metadata_of(padim_graph), forged)
    else:
        zero_largest_initializer(padim_graph, forged)
    if rehash:
        rehashed(forged)
    expected = "does not compute what the model" if rehash else "content SHA-256 differs"
    with pytest.raises(WeightsError, match=expected):
        OnnxDetector(padim_dir, forged)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(noise_jpeg(50, SIZE))
    out = tmp_path / "pred"
    assert (
        main(
            [
                "--quiet",
                "predict",
                str(padim_dir),
                str(images),
                "--out",
                str(out),
                "--backend",
                "onnxruntime",
                "--onnx",
                str(forged),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(forged) in err and expected in err, err
    assert not out.exists()


@pytest.mark.parametrize("target", ["model.safetensors", "sub/x.onnx"])
def test_export_into_the_model_directory_is_refused(target, exported, tmp_path, capsys):
    model_dir = Path(shutil.copytree(exported["padim"][0], tmp_path / "model"))
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    assert main(["--quiet", "export", str(model_dir), "--format", "onnx", "--out", str(model_dir / target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "inside the model directory" in err, err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
