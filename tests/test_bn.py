"""BN re-estimation (spotdiff.models.bn): the cumulative average over clean images, on export-backbone and fit."""

from __future__ import annotations

import json
from pathlib import Path

import _toy_method
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from spotdiff.cli import main
from spotdiff.errors import DataError
from spotdiff.models import build_backbone, load_weights
from spotdiff.models.bn import recalibrate_batchnorm, recalibrate_batchnorm_folder, recalibrated_weights
from spotdiff.pretrain import train
from spotdiff.pretrain.config import load_config


def test_running_stats_become_the_cumulative_average_and_nothing_else_changes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3))
    net[1].running_mean.fill_(5.0)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [torch.randn(4, 3, 8, 8) * (i + 1) + i for i in range(3)]
    assert recalibrate_batchnorm(net, batches) == 12
    with torch.no_grad():
        outs = [net[0](b) for b in batches]
    mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)  # equal batches: mean of batch means
    var = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for o in outs]).mean(0)
    assert torch.allclose(net[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(net[1].running_var, var, rtol=1e-4)
    assert net[1].momentum == 0.3 and not net.training
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())
    with pytest.raises(DataError, match="no images"):
        recalibrate_batchnorm(net, [])


def _folder(path: Path, n: int = 6, size: int = 40) -> Path:
    return _toy_method.make_images(path, n=n, size=size)


def test_folder_without_a_readable_image_changes_nothing(tmp_path):
    net = build_backbone("resnet18")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not an image")
    for folder, message in ((empty, "empty|no image"), (broken, "a.png")):
        with pytest.raises(DataError, match=message):
            recalibrate_batchnorm_folder(net, folder, 32)
        assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_folder_record_and_detector_preprocessing(tmp_path):
    images = _folder(tmp_path / "good")
    net = build_backbone("resnet18")
    record = recalibrate_batchnorm_folder(net, images, 32)
    assert record["images"] == 6 and record["image_size"] == 32 and len(record["files_sha256"]) == 64
    assert not torch.allclose(net.bn1.running_mean, torch.zeros(64))
    # random init is drawn from the detector's seed, so the re-estimated weights are those of its backbone
    loaded = recalibrated_weights(load_weights("resnet18", None), images, 32, seed=3)
    torch.manual_seed(3)
    reference = build_backbone("resnet18")
    assert torch.equal(loaded.state["conv1.weight"], reference.conv1.weight)
    assert "BN re-estimated on 6 images" in loaded.name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bn_export")
    images = _toy_method.make_images(tmp / "images", n=8)
    saved = train.build_method
    train.build_method = _toy_method.build_toy_method
    try:
        cfg = load_config(
            None,
            dict(
                arch="resnet18",
                data=str(images),
                out=str(tmp / "run"),
                steps=1,
                image_size=32,
                workers=0,
                tensorboard=False,
            ),
        )
        return train.run_pretrain(cfg)
    finally:
        train.build_method = saved


def test_export_backbone_bn_recalibrate_records_it_and_refuses_bad_folders(checkpoint, tmp_path, capsys):
    images = _folder(tmp_path / "good")
    plain, bn = tmp_path / "plain.safetensors", tmp_path / "bn.safetensors"
    assert main(["--quiet", "export-backbone", str(checkpoint), "--out", str(plain)]) == 0
    assert (
        main(
            [
                "--quiet",
                "export-backbone",
                str(checkpoint),
                "--out",
                str(bn),
                "--bn-recalibrate",
                str(images),
                "--bn-image-size",
                "32",
            ]
        )
        == 0
    )
    a, b = load_file(plain), load_file(bn)
    assert not torch.equal(a["bn1.running_mean"], b["bn1.running_mean"])
    assert all(torch.equal(a[k], b[k]) for k in a if "running" not in k and "num_batches" not in k)
    with safe_open(str(bn), "pt") as fh:
        meta = fh.metadata()
    assert meta["bn_recalibrated"] == "true" and meta["bn_images"] == "6" and meta["bn_image_size"] == "32"
    capsys.readouterr()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "never.safetensors"
    assert (
        main(["--quiet", "export-backbone", str(checkpoint), "--out", str(out), "--bn-recalibrate", str(broken)]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.jpg" in err[0]
    assert not out.exists()


def test_fit_bn_recalibrate_is_recorded_and_bad_folder_writes_nothing(tmp_path, capsys):
    good = _folder(tmp_path / "good", n=8)
    common = [
        "--quiet",
        "fit",
        "--model",
        "padim",
        "--arch",
        "resnet18",
        "--d",
        "8",
        "--image-size",
        "32",
        "--train",
        str(good),
        "--io-threads",
        "0",
        "--device",
        "cpu",
    ]
    assert main([*common, "--out", str(tmp_path / "model"), "--bn-recalibrate", str(good)]) == 0
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert "BN re-estimated on 8 images" in json.dumps(config)
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*common, "--out", str(tmp_path / "never"), "--bn-recalibrate", str(empty)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "randomly initialised" not in line]
    assert len(err) == 1 and str(empty) in err[0] and "error" in err[0]
    assert not (tmp_path / "never").exists()
