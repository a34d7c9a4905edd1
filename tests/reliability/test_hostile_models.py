"""Hostile checkpoints, weights and model directories through the commands that load them.

A pickle payload anywhere spotdiff reads a model (``fit/finetune --weights``, ``pretrain
--resume``, ``export-backbone``, ``test``/``predict MODEL_DIR``) is refused with exit status 2
naming the file, and never runs: each payload would create a marker folder, which must not exist.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from reliability_helpers import OBJECT, Payload, noise_jpeg, payload_pickle, simple_tree

from spotdiff.cli import main
from spotdiff.detect import load_detector
from spotdiff.errors import WeightsError
from spotdiff.pretrain.checkpoint import FORMAT as CKPT_FORMAT
from spotdiff.pretrain.checkpoint import VERSION as CKPT_VERSION

# torch warns that our payload pickles use protocol 4; the refusal is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


@pytest.fixture(scope="module")
def visa(tmp_path_factory) -> Path:
    return simple_tree(tmp_path_factory.mktemp("visa"), n_train=6, n_good=2, n_bad=2, size=32)


@pytest.fixture(scope="module")
def model_dir(visa, tmp_path_factory) -> Path:
    """A fitted PaDiM model directory (resnet18, 32 px)."""
    out = tmp_path_factory.mktemp("models") / "padim"
    code = main(
        [
            "--quiet",
            "fit",
            "--model",
            "padim",
            "--data",
            str(visa),
            "--object",
            OBJECT,
            "--arch",
            "resnet18",
            "--image-size",
            "32",
            "--d",
            "16",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def _rehash(model: Path) -> None:
    """Rewrite the manifest so its hashes match the (tampered) files: the attacker's best move."""
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["files"] = {name: hashlib.sha256((model / name).read_bytes()).hexdigest() for name in manifest["files"]}
    (model / "manifest.json").write_text(json.dumps(manifest))


def _hostile_model(kind: str, clean: Path, dest: Path, marker: Path) -> Path:
    model = Path(shutil.copytree(clean, dest))
    if kind == "pickle_as_model_rehashed":
        (model / "model.safetensors").write_bytes(payload_pickle(marker))
        _rehash(model)
    elif kind == "torch_zip_as_backbone_rehashed":
        torch.save({"conv1.weight": Payload(marker)}, model / "backbone.safetensors")
        _rehash(model)
    elif kind == "tampered_not_rehashed":
        data = bytearray((model / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (model / "model.safetensors").write_bytes(bytes(data))
    elif kind == "code_in_config_rehashed":
        config = json.loads((model / "config.json").read_text())
        config["model"] = f"__import__('os').makedirs({str(marker)!r})"
        (model / "config.json").write_text(json.dumps(config))
        _rehash(model)
    elif kind == "manifest_is_a_pickle":
        (model / "manifest.json").write_bytes(payload_pickle(marker))
    else:
        raise AssertionError(kind)
    return model


HOSTILE_MODELS = [
    "pickle_as_model_rehashed",
    "torch_zip_as_backbone_rehashed",
    "tampered_not_rehashed",
    "code_in_config_rehashed",
    "manifest_is_a_pickle",
]


@pytest.mark.parametrize("kind", HOSTILE_MODELS)
def test_hostile_model_dirs_are_refused_by_test_and_predict(kind, model_dir, visa, tmp_path, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    model = _hostile_model(kind, model_dir, tmp_path / "model", marker)
    with pytest.raises(WeightsError, match=str(model)):
        load_detector(model)
    image = tmp_path / "x.JPG"
    image.write_bytes(noise_jpeg(3))
    for argv in (
        ["test", str(model), "--data", str(visa), "--object", OBJECT, "--out", str(tmp_path / "test")],
        ["predict", str(model), str(image), "--out", str(tmp_path / "pred")],
    ):
        assert main(["--quiet", *argv]) == 2, argv[0]
        assert str(model) in capsys.readouterr().err
    assert not marker.exists(), f"{kind}: the payload ran"
    assert not (tmp_path / "test").exists() and not (tmp_path / "pred").exists()


def test_unlisted_files_in_a_model_dir_are_never_opened(model_dir, tmp_path, capsys):
    """Only the files in the manifest are read: a stray pickle or .py file beside them is inert."""
    marker = tmp_path / "PAYLOAD_RAN"
    model = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (model / "model.pkl").write_bytes(payload_pickle(marker))
    (model / "__init__.py").write_text(f"import os\nos.makedirs({str(marker)!r})\n")
    image = tmp_path / "x.JPG"
    image.write_bytes(noise_jpeg(4))
    assert main(["--quiet", "predict", str(model), str(image), "--out", str(tmp_path / "pred"), "--no-overlays"]) == 0
    assert (tmp_path / "pred" / "scores.csv").is_file()
    assert not marker.exists()


def _payload_checkpoint(path: Path, marker: Path) -> Path:
    """A file that looks like a pre-training checkpoint but carries a payload in ``model``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CKPT_FORMAT, "version": CKPT_VERSION, "step": 1, "model": {"w": Payload(marker)}}, path)
    return path


def test_pretrain_resume_and_export_refuse_a_payload_checkpoint(tmp_path, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    run = tmp_path / "run"
    ckpt = _payload_checkpoint(run / "checkpoint.pt", marker)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.JPG").write_bytes(noise_jpeg(i))
    code = main(
        [
            "--quiet",
            "pretrain",
            "--method",
            "simsiam",
            "--arch",
            "resnet18",
            "--data",
            str(images),
            "--out",
            str(run),
            "--resume",
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--image-size",
            "32",
            "--workers",
            "0",
        ]
    )
    assert code == 2 and str(ckpt) in capsys.readouterr().err
    out = tmp_path / "backbone.safetensors"
    assert main(["--quiet", "export-backbone", str(ckpt), "--out", str(out)]) == 2
    assert str(ckpt) in capsys.readouterr().err
    assert not out.exists() and not marker.exists()


def test_weights_flags_refuse_payloads(visa, tmp_path, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    weights = tmp_path / "evil.pth"
    weights.write_bytes(payload_pickle(marker))
    runs = {
        "fit": [
            "fit",
            "--model",
            "padim",
            "--data",
            str(visa),
            "--object",
            OBJECT,
            "--arch",
            "resnet18",
            "--image-size",
            "32",
            "--weights",
            str(weights),
            "--out",
            str(tmp_path / "fit"),
        ],
        "finetune": [
            "finetune",
            "--task",
            "cls",
            "--protocol",
            "highshot",
            "--data",
            str(visa),
            "--object",
            OBJECT,
            "--arch",
            "resnet18",
            "--weights",
            str(weights),
            "--seeds",
            "1",
            "--steps",
            "1",
            "--image-size",
            "32",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "ft"),
        ],
        "pretrain": [
            "pretrain",
            "--method",
            "simsiam",
            "--arch",
            "resnet18",
            "--data",
            str(visa / OBJECT),
            "--weights",
            str(weights),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--image-size",
            "32",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "pt"),
        ],
    }
    for name, argv in runs.items():
        assert main(["--quiet", *argv]) == 2, name
        err = capsys.readouterr().err
        assert str(weights) in err and "Traceback" not in err, (name, err)
    assert not marker.exists()
