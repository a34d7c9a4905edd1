"""The one configuration mechanism (spotdiff.configs) and its three users: pretrain, finetune, benchmark."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from spotdiff.configs import build, read_mapping, rule
from spotdiff.devices import check_device_name
from spotdiff.errors import ConfigError


@dataclass(frozen=True)
class Toy:
    name: str
    size: int = field(default=8, metadata=rule(minimum=1))
    rate: float = field(default=0.5, metadata=rule(finite=True, above=0))
    mode: str = field(default="a", metadata=rule(choices=("a", "b")))
    device: str = field(default="auto", metadata=rule(check=check_device_name))
    root: Path | None = None
    layers: tuple[str, ...] = ("layer1",)
    extra: dict[str, int] = field(default_factory=dict)
    flag: bool = False


def test_build_coerces_from_the_annotations_and_fills_defaults():
    toy = build(Toy, {"name": "x", "rate": 2, "root": "data", "layers": ["layer2", "layer3"]}, "t.yaml")
    assert toy == Toy("x", rate=2.0, root=Path("data"), layers=("layer2", "layer3"))
    assert isinstance(toy.rate, float) and isinstance(toy.root, Path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        toy.size = 3  # type: ignore[misc]  # frozen on purpose: checked once, then read only
    text = {"name": "x", "size": "3", "rate": "1e-3", "flag": "yes", "root": "none", "extra": "{a: 1}"}
    assert build(Toy, text, "--set", from_text=True) == Toy("x", 3, 1e-3, flag=True, extra={"a": 1})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "sise": 3}, r"^t\.yaml: unknown key 'sise' \(did you mean 'size'\?\); known keys: name, size"),
        ({"name": "x", "size": "3"}, r"^t\.yaml: size='3' is not a valid int$"),
        ({"name": "x", "size": True}, r"^t\.yaml: size=True is not a valid int$"),
        ({"name": "x", "size": 0}, r"^t\.yaml: size: must be >= 1, got 0$"),
        ({"name": "x", "rate": float("nan")}, r"^t\.yaml: rate: must be a finite number > 0, got nan$"),
        ({"name": "x", "mode": "c"}, r"^t\.yaml: mode: 'c' is not one of a, b$"),
        ({"name": "x", "device": "tpu"}, r"^t\.yaml: device 'tpu': choose auto, cpu, cuda or cuda:N$"),
        ({"name": "x", "extra": {1: 2}}, r"^t\.yaml: extra must map names to values$"),
        ({"name": None}, r"^t\.yaml: name may not be empty \(expected str\)$"),
        ({}, r"^t\.yaml: missing key\(s\) name"),
        (["name"], r"^t\.yaml: expected a mapping of config keys, got list$"),
    ],
)
def test_every_bad_value_is_one_line_naming_the_source_and_key(data, message):
    with pytest.raises(ConfigError, match=message) as err:
        build(Toy, data, "t.yaml")
    assert "\n" not in str(err.value)


def test_read_mapping_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        read_mapping(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping"):
        read_mapping(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert read_mapping(tmp_path / "empty.yaml") == {}


def test_the_three_commands_refuse_an_unknown_key_and_a_bad_device_alike(tmp_path):
    """Pretrain, finetune and benchmark configs go through the same helper: the same message shape."""
    from spotdiff.bench.config import load_config as load_benchmark
    from spotdiff.finetune.train import FinetuneConfig
    from spotdiff.pretrain.config import load_config as load_pretrain

    pre = tmp_path / "pre.yaml"
    pre.write_text(yaml.safe_dump({"data": "d", "out": "o", "devise": "cpu"}))
    with pytest.raises(ConfigError, match=r"pre\.yaml: unknown key 'devise' \(did you mean 'device'\?\)"):
        load_pretrain(pre)
    with pytest.raises(ConfigError, match=r"^config: device 'tpu': choose auto, cpu, cuda or cuda:N$"):
        load_pretrain(None, overrides={"data": "d", "out": "o", "device": "tpu"}).validate()
    with pytest.raises(ConfigError, match=r"^finetune: device 'tpu': choose auto, cpu, cuda or cuda:N$"):
        FinetuneConfig(task="cls", protocol="5shot", data=tmp_path, out=tmp_path, device="tpu").validate()
    with pytest.raises(ConfigError, match=r"^finetune: workers: must be >= 0, got -1$"):
        FinetuneConfig(task="cls", protocol="5shot", data=tmp_path, out=tmp_path, workers=-1).validate()
    bench = tmp_path / "bench.yaml"
    base = {
        "data": {"root": "d"},
        "objects": ["o"],
        "weights": [{"name": "w", "file": "random"}],
        "downstream": [{"method": "padim"}],
    }
    bench.write_text(yaml.safe_dump({**base, "devise": "cpu"}))
    with pytest.raises(ConfigError, match=r"bench\.yaml: unknown key 'devise' \(did you mean 'device'\?\)"):
        load_benchmark(bench)
    bench.write_text(yaml.safe_dump({**base, "device": "tpu"}))
    with pytest.raises(ConfigError, match=r"bench\.yaml: device 'tpu': choose auto, cpu, cuda or cuda:N$"):
        load_benchmark(bench)
    bench.write_text(yaml.safe_dump({**base, "weights": [{"name": "w", "file": "random", "arch": 18}]}))
    with pytest.raises(ConfigError, match=r"bench\.yaml: weights\[0\]: arch=18 is not a valid str$"):
        load_benchmark(bench)
    bench.write_text(yaml.safe_dump(base))
    assert load_benchmark(bench).device == load_benchmark(bench, device="auto").device == "auto"


def test_a_benchmark_cell_refuses_an_unknown_finetune_param_in_one_line(tmp_path):
    from spotdiff.bench.cells import run_cls_cell
    from spotdiff.bench.config import parse_config
    from spotdiff.bench.grid import grid

    data = {
        "data": {"root": "d"},
        "objects": ["o"],
        "weights": [{"name": "w", "file": "random"}],
        "downstream": [{"name": "c", "method": "cls", "params": {"protocol": "5shot", "seedz": 2}}],
    }
    config = parse_config(data, tmp_path, "b.yaml")
    (cell,) = grid(config, {"w": None})
    with pytest.raises(ConfigError, match=r"^downstream 'c': params: unknown key 'seedz' \(did you mean 'seeds'\?\)"):
        run_cls_cell(cell, config, tmp_path / "work")


def test_named_check_puts_the_field_in_front_of_a_one_argument_check():
    from spotdiff.configs import named_check
    from spotdiff.finetune.train import FinetuneConfig
    from spotdiff.models.arch import check_arch

    run = named_check(check_arch)
    assert run("resnet18", "cfg.yaml: arch") == "resnet18"
    with pytest.raises(ConfigError, match=r"^cfg.yaml: arch: unknown architecture 'vgg'"):
        run("vgg", "cfg.yaml: arch")
    with pytest.raises(ConfigError, match=r"^cfg.yaml: protocol: unknown protocol '7shot'"):
        build(FinetuneConfig, {"data": "x", "object": "y", "task": "cls", "out": "o", "protocol": "7shot"}, "cfg.yaml")
