"""Image I/O, atomic files, backbones and weight loading, CLI entry point."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from spotdiff.cli import main
from spotdiff.data.io import load_image, load_mask
from spotdiff.errors import DataError, WeightsError
from spotdiff.files import atomic_path, write_json_atomic
from spotdiff.models import build_backbone, extract_features, inference_backbone, layer_channels, read_weights_file


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA", "1"])
def test_load_image_converts_every_mode_to_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((rng.integers(0, 65536, (8, 10))).astype(np.uint16))
    else:
        img = rgb.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (10, 8)


def test_load_image_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (20, 10), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (10, 20)


@pytest.mark.parametrize(
    "content, message",
    [(None, "file not found"), (b"", "empty file"), (b"\xff\xd8\xff\xe0garbage", "cannot read image")],
)
def test_load_image_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.JPG"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_truncated_jpeg_is_refused(tmp_path):
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")


def test_load_mask_keeps_class_ids(tmp_path):
    mask = np.zeros((6, 6), np.uint8)
    mask[1:3, 1:3] = 3
    mask[4, 4] = 7
    Image.fromarray(mask).save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), mask)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "sub" / "out.json"
    write_json_atomic(dest, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert dest.read_text().strip().startswith("{")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out.json"]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "wide_resnet50_2"])
def test_extract_features_shapes(arch):
    model = build_backbone(arch).eval()
    with torch.no_grad():
        feats = extract_features(model, torch.randn(1, 3, 64, 64), ["layer1", "layer2", "layer3"])
    channels = layer_channels(arch, ["layer1", "layer2", "layer3"])
    assert [tuple(f.shape) for f in feats.values()] == [
        (1, channels[0], 16, 16),
        (1, channels[1], 8, 8),
        (1, channels[2], 4, 4),
    ]


@pytest.mark.parametrize("arch,layers", [("resnet18", ["layer1", "layer2", "layer3"]), ("resnet50", ["layer2"])])
def test_inference_backbone_computes_the_same_features(arch, layers):
    torch.manual_seed(0)
    model = build_backbone(arch).eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so folding is really exercised
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = inference_backbone(model, layers)
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected, got = extract_features(model, images, layers), extract_features(fused, images, layers)
    for name in layers:
        scale = expected[name].abs().max()
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5 * float(scale))
        assert got[name].is_contiguous(memory_format=torch.channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert isinstance(fused.layer4, torch.nn.Identity) and not any(p.requires_grad for p in fused.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched


def test_weights_roundtrip_safetensors_and_pth(tmp_path):
    src = build_backbone("resnet18")
    body = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    save_file(body, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in body.items()}}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = build_backbone("resnet18", tmp_path / name)
        for k, v in body.items():
            assert torch.equal(model.state_dict()[k], v), k


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    body = build_backbone("resnet18").state_dict()
    body.pop("layer1.0.conv1.weight")
    body["extra.weight"] = torch.zeros(1)
    save_file(body, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match=r"missing keys \[layer1.0.conv1.weight\].*extra.weight"):
        build_backbone("resnet18", tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="do not fit"):
        build_backbone("resnet50", tmp_path / "w.safetensors")


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="evil.pth"):
        read_weights_file(tmp_path / "evil.pth")
    assert not marker.exists()


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "synth" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "spotdiff", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("spotdiff ")


def test_load_mask_is_writable(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")
    mask[0, 0] = 1
    assert mask.flags.writeable and mask[0, 0] == 1


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    import os

    from spotdiff.files import default_mode

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "r.json", {})
        assert (tmp_path / "r.json").stat().st_mode & 0o777 == default_mode() == 0o644
    finally:
        os.umask(old)


def test_quiet_is_accepted_before_or_after_every_command():
    from spotdiff.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"fit", "test", "predict", "pretrain", "demo", "benchmark", "serve"} <= set(commands)
    for name, command in commands.items():
        assert any("--quiet" in a.option_strings for a in command._actions), name
    before = parser.parse_args(["--quiet", "demo"])
    after = parser.parse_args(["demo", "--quiet"])
    neither = parser.parse_args(["demo"])
    assert before.quiet is True and after.quiet is True and neither.quiet is False
