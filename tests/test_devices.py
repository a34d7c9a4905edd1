"""One device rule for every command: ``auto`` (the default) is CUDA when available, else CPU."""

from __future__ import annotations

import pytest
import torch

from spotdiff.cli import build_parser, main
from spotdiff.devices import resolve_device
from spotdiff.errors import ConfigError
from spotdiff.finetune.train import FinetuneConfig
from spotdiff.pretrain.config import PretrainConfig


def test_auto_is_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'cuda:1' requested but CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="bad device 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(
        ConfigError, match=r"'cuda:2' requested but this machine has 2 CUDA device\(s\), cuda:0..cuda:1"
    ):
        resolve_device("cuda:2")


def test_device_names_are_checked_when_a_config_is_read():
    from spotdiff.devices import check_device_name

    for name in ("auto", "cpu", "cuda", "cuda:3"):
        assert check_device_name(name) == name
    for bad in ("tpu", "cuda:", "CUDA", 0, None):
        with pytest.raises(ConfigError, match=r"^x.yaml: device .*: choose auto, cpu, cuda or cuda:N$"):
            check_device_name(bad, "x.yaml: device")


def test_every_command_defaults_to_auto():
    parser = build_parser()
    for argv in (
        ["fit", "--model", "padim", "--out", "m"],
        ["test", "m", "--out", "r"],
        ["predict", "m", "x.png", "--out", "p"],
        ["finetune", "--task", "cls", "--protocol", "5shot", "--data", "d", "--out", "o"],
    ):
        assert parser.parse_args(argv).device == "auto", argv[0]
    assert PretrainConfig.device == "auto" and FinetuneConfig.device == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_one_line_exit_2(tmp_path, capsys):
    argv = ["predict", str(tmp_path), str(tmp_path), "--device", "cuda", "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "device 'cuda' requested but CUDA is not available" in err


def test_detectors_take_auto_from_the_library_like_every_command(monkeypatch):
    from spotdiff.detect import PaDiM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    images = [{"image": torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i))} for i in range(4)]
    model = PaDiM(arch="resnet18", d=8, device="auto").fit(images)
    assert model.device_ == torch.device("cpu") and model.forward_batch == min(model.batch_size, 4)
    scores, maps = model.predict(torch.stack([x["image"] for x in images]))
    assert torch.isfinite(scores).all() and maps.shape[-2:] == (32, 32)
    with pytest.raises(ConfigError, match="bad device 'tpu'"):
        PaDiM(arch="resnet18", d=8, device="tpu").fit(images)
