"""Fail closed on numbers and models (issue 25, items 1, 2, 4, 5): nothing non-finite gets into a model or
a threshold, model directories are schema-checked on load, a bad weights cache is never torchvision's,
and ``fit --out`` never deletes files that are not the model's.

Every refusal is one line on stderr naming the file and key, exit status 2, and nothing written.
Tampered model directories are re-hashed (the manifest made to match), the attacker's best move.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_helpers import noise_jpeg, payload_pickle
from safetensors.torch import load_file, save_file
from torchvision.models import resnet18

from spotdiff.cli import main
from spotdiff.detect import PaDiM, PatchCore, fit_folder, load_detector
from spotdiff.detect.evaluate import evaluate_detector
from spotdiff.detect.schema import MAX_IMAGE_SIDE
from spotdiff.errors import ConfigError, DataError, WeightsError

TINY_FIT = ["--quiet", "fit", "--model", "padim", "--arch", "resnet18", "--d", "8", "--image-size", "32"]
"""`spotdiff fit` of a tiny PaDiM (add the images, weights and --out)."""

SIZE = 32
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i:03d}.jpg").write_bytes(noise_jpeg(seed + i, SIZE))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images") / "good", 12)


@pytest.fixture(scope="module")
def models(images, tmp_path_factory) -> dict[str, Path]:
    """Calibrated PaDiM and PatchCore directories (resnet18, random init, 32 px)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, model in (
        ("padim", PaDiM(arch="resnet18", d=16)),
        ("patchcore", PatchCore(arch="resnet18", coreset_ratio=0.5, num_neighbors=3)),
    ):
        fit_folder(model, images, image_size=SIZE)
        out[name] = model.save(root / name)
    return out


def rehash(model: Path) -> None:
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["files"] = {n: hashlib.sha256((model / n).read_bytes()).hexdigest() for n in manifest["files"]}
    (model / "manifest.json").write_text(json.dumps(manifest))


def one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    return err


def edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        replaced = change(config)
        (model / "config.json").write_text(json.dumps(config if replaced is None else replaced))

    return apply


def edit_tensor(file: str, name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        tensors = load_file(str(model / file))
        tensors[name] = change(tensors[name].clone())
        save_file(tensors, str(model / file), metadata={"format": "pt"} if file == "backbone.safetensors" else None)

    return apply


def _nan_first(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[0] = float("nan")
    return t


def _set(config: dict, path: tuple, value: object) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value


# (model, tamper, what the one line must name)
TAMPERED = {
    "config_is_a_list": ("padim", edit_config(lambda c: [c]), ["config.json", "JSON object", "list"]),
    "config_is_null": ("padim", lambda m: (m / "config.json").write_text("null"), ["config.json", "JSON object"]),
    "image_size_0": ("padim", edit_config(lambda c: _set(c, ("image_size",), [0, 0])), ["'image_size'"]),
    "image_size_negative": ("padim", edit_config(lambda c: _set(c, ("image_size",), [-32, 32])), ["'image_size'"]),
    "image_size_100000": (
        "padim",
        edit_config(lambda c: _set(c, ("image_size",), [100000, 100000])),
        ["'image_size'", str(MAX_IMAGE_SIDE)],
    ),
    "missing_arch": ("padim", edit_config(lambda c: c.pop("arch") and None), ["'arch'", "missing"]),
    "unknown_layer": ("padim", edit_config(lambda c: _set(c, ("layers",), ["layer9"])), ["'layers'"]),
    "seed_negative": ("padim", edit_config(lambda c: _set(c, ("seed",), -1)), ["'seed'"]),
    "image_threshold_string": (
        "padim",
        edit_config(lambda c: _set(c, ("calibration", "image_threshold"), "high")),
        ["image_threshold"],
    ),
    "image_threshold_nan": (
        "padim",
        edit_config(lambda c: _set(c, ("calibration", "image_threshold"), math.nan)),
        ["image_threshold", "finite"],
    ),
    "pixel_threshold_inf": (
        "padim",
        edit_config(lambda c: _set(c, ("calibration", "pixel_threshold"), math.inf)),
        ["pixel_threshold", "finite"],
    ),
    "normal_scores_string": (
        "padim",
        edit_config(lambda c: _set(c, ("calibration", "normal_scores"), "many")),
        ["normal_scores"],
    ),
    "normal_scores_all_nan": (
        "padim",
        edit_config(lambda c: _set(c, ("calibration", "normal_scores"), [math.nan] * 3)),
        ["normal_scores", "finite"],
    ),
    "normal_maps_nan": (
        "padim",
        edit_config(lambda c: _set(c, ("normal_maps", "score_max"), math.nan)),
        ["normal_maps", "'score_max'"],
    ),
    "d_not_the_tensors": ("padim", edit_config(lambda c: _set(c, ("d",), 8)), ["'mean'", "shape"]),
    "channel_index_out_of_range": (
        "padim",
        edit_tensor("model.safetensors", "channel_index", lambda t: t.index_fill_(0, torch.tensor([15]), 100000)),
        ["'channel_index'", "[0, 447]"],
    ),
    "mean_nan": ("padim", edit_tensor("model.safetensors", "mean", _nan_first), ["'mean'", "non-finite"]),
    "inverse_cholesky_inf": (
        "padim",
        edit_tensor("model.safetensors", "inv_cholesky_packed", lambda t: t.fill_(math.inf)),
        ["'inv_cholesky_packed'"],
    ),
    "backbone_nan": (
        "padim",
        edit_tensor("backbone.safetensors", "conv1.weight", _nan_first),
        ["backbone.safetensors", "'conv1.weight'", "non-finite"],
    ),
    "num_neighbors_0": ("patchcore", edit_config(lambda c: _set(c, ("num_neighbors",), 0)), ["'num_neighbors'"]),
    "num_neighbors_above_bank": (
        "patchcore",
        edit_config(lambda c: _set(c, ("num_neighbors",), 10**6)),
        ["'memory_bank'", "num_neighbors"],
    ),
    "target_dim_7": ("patchcore", edit_config(lambda c: _set(c, ("target_dim",), 7)), ["'memory_bank'", "7"]),
    "bank_wrong_width": (
        "patchcore",
        edit_tensor("model.safetensors", "memory_bank", lambda t: t[:, :-1].contiguous()),
        ["'memory_bank'", "384"],
    ),
    "bank_nan": ("patchcore", edit_tensor("model.safetensors", "memory_bank", _nan_first), ["'memory_bank'"]),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_model_is_refused_on_load_in_one_line(case, models, images, tmp_path, capsys):
    kind, tamper, names = TAMPERED[case]
    model = Path(shutil.copytree(models[kind], tmp_path / "model"))
    tamper(model)
    rehash(model)
    with pytest.raises(WeightsError, match=str(model).replace("\\", "\\\\")):
        load_detector(model)
    for argv in (
        ["predict", str(model), str(images), "--out", str(tmp_path / "pred")],
        ["test", str(model), "--good", str(images), "--bad", str(images), "--out", str(tmp_path / "test")],
    ):
        assert main(["--quiet", *argv]) == 2, argv[0]
        one_line_error(capsys, str(model), *names)
    assert not (tmp_path / "pred").exists() and not (tmp_path / "test").exists()


def test_the_untampered_models_load_and_predict(models, images, tmp_path, capsys):
    """The fixtures themselves are valid: every refusal above is the tampering's."""
    for name, model in models.items():
        assert (
            main(["--quiet", "predict", str(model), str(images), "--out", str(tmp_path / name), "--no-overlays"]) == 0
        )
        rows = (tmp_path / name / "scores.csv").read_text().splitlines()
        assert len(rows) == 13 and all(",nan," not in row for row in rows)


# ------------------------------------------------------------------------------ numbers on the command line
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("option", ["--threshold", "--pixel-threshold"])
def test_predict_refuses_a_non_finite_threshold(option, value, models, images, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["--quiet", "predict", str(models["padim"]), str(images), "--out", str(out), f"{option}={value}"]) == 2
    one_line_error(capsys, option, "finite")
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--threshold-mode", "manual", "--threshold", "nan"], "--threshold"),
        (["--threshold-mode", "manual", "--threshold", "inf"], "--threshold"),
        (["--pixel-threshold", "nan"], "--pixel-threshold"),
        (["--target-fpr", "nan"], "false-positive rate"),
        (["--split-seed", "-1"], "--split-seed"),
        (["--seed", str(2**70)], "--seed"),
        (["--seed", "-3"], "--seed"),
    ],
)
def test_fit_refuses_bad_numbers_before_reading_anything(argv, named, images, tmp_path, capsys):
    out = tmp_path / "m"
    assert main([*TINY_FIT, "--train", str(images), "--weights", "random", "--out", str(out), *argv]) == 2
    one_line_error(capsys, named)
    assert not out.exists()


def test_test_refuses_a_negative_split_seed(models, images, tmp_path, capsys):
    assert (
        main(
            [
                "--quiet",
                "test",
                str(models["padim"]),
                "--good",
                str(images),
                "--bad",
                str(images),
                "--split-seed",
                "-1",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 2
    )
    one_line_error(capsys, "--split-seed")


def test_test_refuses_non_finite_scores(models, images):
    """A model whose scores go NaN at test time: one DataError naming the image, no metrics."""
    from spotdiff.data.plain import open_folders

    model = load_detector(models["padim"])
    model.mean_ = model.mean_.clone().fill_(math.nan)  # what a model with NaN statistics would score
    test, _ = open_folders(images, image_size=model.image_size_)  # the check comes before any metric
    with pytest.raises(DataError, match=r"\.jpg: the model gives a non-finite score"):
        evaluate_detector(model, test, num_workers=0)


# ------------------------------------------------------------------------------ nothing non-finite is fitted
def test_a_backbone_with_nan_weights_does_not_fit(images, tmp_path, capsys):
    weights = tmp_path / "nan.safetensors"
    state = {k: v.clone() for k, v in resnet18().state_dict().items()}
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = math.nan
    save_file(state, str(weights))
    out = tmp_path / "m"
    assert main([*TINY_FIT, "--train", str(images), "--weights", str(weights), "--out", str(out)]) == 2
    one_line_error(capsys, str(weights), "'layer1.0.conv1.weight'", "non-finite")
    assert not out.exists()


def test_non_finite_validation_scores_are_never_calibrated(images, tmp_path, monkeypatch):
    """Scores that go NaN after fitting (here forced): calibration refuses, naming an image; nothing saved."""
    model = PaDiM(arch="resnet18", d=8)
    original = PaDiM._predict_normalized

    def nan_scores(self, batch):
        scores, maps = original(self, batch)
        return scores * math.nan, maps

    monkeypatch.setattr(PaDiM, "_predict_normalized", nan_scores)
    with pytest.raises(DataError, match=r"\.jpg: the model gives a non-finite score"):
        fit_folder(model, images, image_size=SIZE)
    assert model.calibration_ is None


def test_save_refuses_non_finite_statistics(models, tmp_path):
    model = load_detector(models["patchcore"])
    model.memory_bank_[0, 0] = math.inf
    with pytest.raises(DataError, match="not written.*'memory_bank'.*non-finite"):
        model.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("ratio", ["0.0001", "0.001"])
def test_a_coreset_smaller_than_num_neighbors_is_refused_at_fit(ratio, images, tmp_path, capsys):
    """12 images x 16 patches: 0.0001 would keep 1 row (every score 0 +- rounding), 0.001 would keep 1 too."""
    out = tmp_path / "m"
    assert (
        main(
            [
                "--quiet",
                "fit",
                "--model",
                "patchcore",
                "--arch",
                "resnet18",
                "--image-size",
                "32",
                "--coreset-ratio",
                ratio,
                "--train",
                str(images),
                "--weights",
                "random",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    one_line_error(capsys, "num_neighbors = 9", "--coreset-ratio")
    assert not out.exists()


def test_one_neighbour_is_refused():
    """With b = 1 the weight of eq. 7 is 1 - exp(s*)/exp(s*) = 0: every image would score 0."""
    with pytest.raises(ConfigError, match="num_neighbors must be an integer >= 2"):
        PatchCore(arch="resnet18", num_neighbors=1).check_params()


# ------------------------------------------------------------------------------ weights files
def test_a_refused_pickle_is_one_line_without_torchs_advice(images, tmp_path, capsys):
    weights = tmp_path / "evil.pth"
    marker = tmp_path / "PAYLOAD_RAN"
    weights.write_bytes(payload_pickle(marker))
    assert (
        main(
            [
                "--quiet",
                "fit",
                "--model",
                "padim",
                "--arch",
                "resnet18",
                "--image-size",
                "32",
                "--train",
                str(images),
                "--weights",
                str(weights),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    err = one_line_error(capsys, str(weights), "refused", "pickled")
    assert "weights_only" not in err and not marker.exists()
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(payload_pickle(marker))
    assert main(["--quiet", "export-backbone", str(checkpoint), "--out", str(tmp_path / "b.safetensors")]) == 2
    err = one_line_error(capsys, str(checkpoint), "refused", "pickled")
    assert "weights_only" not in err and not marker.exists() and not (tmp_path / "b.safetensors").exists()


# ------------------------------------------------------------------------------ fit --out
def test_a_probe_file_the_manifest_does_not_list_is_not_replaced_silently(models, tmp_path):
    """``probe.safetensors`` is the model's own only when its manifest lists it; otherwise it is a file
    spotdiff did not write, and saving over the directory needs ``overwrite``."""
    import json

    from spotdiff.detect import load_detector, store

    out = Path(shutil.copytree(models["padim"], tmp_path / "m"))
    manifest = json.loads((out / store.MANIFEST_FILE).read_text())
    assert store.PROBE_FILE in manifest["files"]
    model = load_detector(out)
    model.save(out)  # listed: the directory holds only its model and is replaced
    del manifest["files"][store.PROBE_FILE]
    (out / store.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=store.PROBE_FILE):
        model.save(out)
    model.save(out, overwrite=True)
    assert store.PROBE_FILE in json.loads((out / store.MANIFEST_FILE).read_text())["files"]


def test_fit_out_over_a_model_directory_with_other_files_needs_overwrite(models, images, tmp_path, capsys):
    out = Path(shutil.copytree(models["padim"], tmp_path / "m"))
    (out / "scores.csv").write_text("path,score\n")
    (out / "overlays").mkdir()
    (out / "overlays" / "a.png").write_bytes(b"png")
    (out / "notes.txt").write_text("my notes")
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = [*TINY_FIT, "--train", str(images), "--weights", "random", "--out", str(out)]
    assert main(argv) == 2
    one_line_error(capsys, str(out), "notes.txt", "overlays", "scores.csv", "--overwrite")
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "backbone.safetensors",
        "config.json",
        "manifest.json",
        "model.safetensors",
        "probe.safetensors",
    ]
    assert load_detector(out).d_ == 8
    assert main(argv) == 0  # a directory holding only its model is replaced as before
    user = tmp_path / ".m.old-mine"  # named like an interrupted save's leftover, but not only model files
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    (tmp_path / ".m.old-killed").mkdir()  # a real leftover (empty): cleaned up
    assert main(argv) == 0
    assert (user / "notes.txt").read_text() == "keep" and not (tmp_path / ".m.old-killed").exists()


# ------------------------------------------------------------------------------ decompression bombs
def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A PNG header declaring ``width x height`` (9e8 pixels, 10x PIL's bomb limit) with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_decompression_bomb_mask_is_one_line(models, images, tmp_path, capsys):
    bad = write_images(tmp_path / "bad", 2, seed=100)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(masks / "000.png")
    (masks / "001.png").write_bytes(bomb_png())
    assert (
        main(
            [
                "--quiet",
                "test",
                str(models["padim"]),
                "--good",
                str(images),
                "--bad",
                str(bad),
                "--masks",
                str(masks),
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 2
    )
    one_line_error(capsys, str(masks / "001.png"))
    assert (
        main(
            [
                *TINY_FIT,
                "--train",
                str(images),
                "--weights",
                "random",
                "--val-bad",
                str(bad),
                "--val-masks",
                str(masks),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    one_line_error(capsys, str(masks / "001.png"))
    assert not (tmp_path / "t").exists() and not (tmp_path / "m").exists()
