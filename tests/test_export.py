"""export-backbone: torchvision-compatible safetensors; unsafe checkpoints are refused unexecuted."""

from __future__ import annotations

import os
from pathlib import Path

import _toy_method
import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file

from spotdiff.cli import main
from spotdiff.errors import WeightsError
from spotdiff.models import build_backbone
from spotdiff.pretrain import train
from spotdiff.pretrain.checkpoint import load_checkpoint, save_checkpoint
from spotdiff.pretrain.config import load_config
from spotdiff.pretrain.export import export_backbone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    images = _toy_method.make_images(tmp / "images", n=8)
    saved = train.build_method
    train.build_method = _toy_method.build_toy_method
    try:
        torch.set_num_threads(1)
        cfg = load_config(
            None,
            dict(
                arch="resnet18",
                data=str(images),
                out=str(tmp / "run"),
                steps=1,
                image_size=32,
                workers=0,
                spd=True,
                eta=0.25,
                tensorboard=False,
            ),
        )
        return train.run_pretrain(cfg)
    finally:
        train.build_method = saved


def test_exported_weights_load_into_torchvision(checkpoint, tmp_path):
    out = export_backbone(checkpoint, tmp_path / "w.safetensors")
    state = load_file(out)
    model = torchvision.models.resnet18()
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    trained = load_checkpoint(checkpoint)["backbone"]
    assert all(torch.equal(state[k], trained[k]) for k in state)
    with safe_open(out, "pt") as fh:
        meta = fh.metadata()
    assert meta == {
        "format": "spotdiff.backbone",
        "arch": "resnet18",
        "method": "simsiam",
        "spd": "True",
        "eta": "0.25",
        "step": "1",
    }
    downstream = build_backbone("resnet18", weights=out)
    assert torch.equal(downstream.layer4[1].bn2.running_var, trained["layer4.1.bn2.running_var"])


def test_export_cli_and_arch_check(checkpoint, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["--quiet", "export-backbone", str(checkpoint), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert (
        main(
            [
                "--quiet",
                "export-backbone",
                str(checkpoint),
                "--out",
                str(tmp_path / "x.safetensors"),
                "--arch",
                "resnet50",
            ]
        )
        == 2
    )
    assert "checkpoint backbone is resnet18, not resnet50" in capsys.readouterr().err
    with pytest.raises(WeightsError, match=r"\.safetensors file"):
        export_backbone(checkpoint, tmp_path / "w.pth")
    assert not (tmp_path / "x.safetensors").exists()


class _Payload:
    """Pickling this object makes unpickling call ``Path.touch(marker)``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_object_in_checkpoint_is_refused_and_never_runs(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    payload = load_checkpoint(checkpoint)
    evil = tmp_path / "evil.pt"
    torch.save({**payload, "config": {"arch": "resnet18", "hook": _Payload(marker)}}, evil)
    with pytest.raises(WeightsError, match=r"evil\.pt: refused or unreadable checkpoint"):
        load_checkpoint(evil)
    with pytest.raises(WeightsError, match="refused"):
        export_backbone(evil, tmp_path / "w.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "w.safetensors").exists()


def test_checkpoint_file_checks(tmp_path):
    with pytest.raises(WeightsError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="junk.pt: refused or unreadable"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="not a spotdiff pre-training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    save_checkpoint(tmp_path / "nobackbone.pt", {"step": 0, "config": {"arch": "resnet18"}})
    with pytest.raises(WeightsError, match="no backbone state"):
        export_backbone(tmp_path / "nobackbone.pt", tmp_path / "w.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["junk.pt", "nobackbone.pt", "other.pt"]


def test_safetensors_with_metadata_are_byte_reproducible(tmp_path):
    from spotdiff.files import save_safetensors_atomic

    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(4, dtype=torch.float64)}
    metadata = {f"key{i}": f"välue {i}" for i in range(12)}  # 12! orders: an unsorted write shows at once
    blobs = set()
    for i in range(6):
        save_safetensors_atomic(tmp_path / f"{i}.safetensors", tensors, metadata=metadata)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    with safe_open(tmp_path / "0.safetensors", "pt") as fh:
        assert fh.metadata() == metadata
    loaded = load_file(tmp_path / "0.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
