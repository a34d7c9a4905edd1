"""The benchmark's YAML config: :func:`load_config` reads and validates it into a :class:`BenchmarkConfig`.

Config (YAML; relative paths are relative to the config file)::

    objects: [candle, capsules]
    image_size: 256
    seed: 0
    device: cuda                      # cpu | cuda
    weights:
      - {name: random_r18, arch: resnet18}                       # no file: random init (warns; file: random does not)
      - {name: imagenet_r18, arch: resnet18, file: imagenet}     # torchvision's ImageNet weights (or IMAGENET1K_V1, ...)
      - {name: simsiam_spd_r50, arch: resnet50, file: w/simsiam_spd_r50.safetensors}
      - name: tiny_simsiam                                       # pre-trained first
        arch: resnet18
        pretrain: {method: simsiam, spd: true, steps: 100, image_size: 96, data: images/}
    downstream:
      - {name: padim, method: padim, params: {layers: [layer1, layer2, layer3]}}
      - {name: patchcore, method: patchcore, weights: [wrn50_simsiam]}  # only these weights
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from spotdiff.bench.cells import DOWNSTREAM
from spotdiff.bench.schema import BenchmarkConfig, DownstreamSpec, WeightsSpec
from spotdiff.errors import ConfigError, WeightsError
from spotdiff.models import ARCHITECTURES, is_weights_name

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*(_[A-Za-z0-9.+-]+)*$")  # no "__", filename-safe


def _check_name(kind: str, name: Any, source: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{source}: {kind} name {name!r} must be letters, digits, '.', '+', '-' or single '_' (no '__', no '/')"
        )
    return name


def _check_unique(kind: str, names: list[str], source: str) -> None:
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: duplicate {kind} names in {names}")


def _mapping(value: Any, what: str, source: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {what} must be a mapping, got {type(value).__name__}")
    return dict(value)


def parse_config(data: Mapping[str, Any], base_dir: Path, source: str = "config") -> BenchmarkConfig:
    """Validate a config mapping (see module docstring); relative paths resolve against ``base_dir``."""
    data = _mapping(data, "the config", source)
    known = {
        "data",
        "objects",
        "weights",
        "downstream",
        "image_size",
        "seed",
        "device",
        "batch_size",
        "report",
        "title",
    }
    if unknown := sorted(set(data) - known):
        raise ConfigError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(known)}")

    def path(value: Any, what: str) -> Path:
        if not isinstance(value, str | os.PathLike) or not str(value):
            raise ConfigError(f"{source}: {what} must be a path, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base_dir / p)

    root = _mapping(data.get("data"), "data", source).get("root")
    if root is None:
        raise ConfigError(f"{source}: data.root (the dataset root) is required")
    objects = data.get("objects")
    if not isinstance(objects, list) or not objects or not all(isinstance(o, str) for o in objects):
        raise ConfigError(f"{source}: objects must be a non-empty list of object names")
    for obj in objects:
        _check_name("object", obj, source)

    weights = []
    for i, entry in enumerate(data.get("weights") or []):
        entry = _mapping(entry, f"weights[{i}]", source)
        if unknown := sorted(set(entry) - {"name", "arch", "file", "pretrain"}):
            raise ConfigError(f"{source}: weights[{i}]: unknown key(s) {unknown}")
        name = _check_name("weights", entry.get("name"), f"{source}: weights[{i}]")
        arch = entry.get("arch", "resnet18")
        if arch not in ARCHITECTURES:
            raise ConfigError(
                f"{source}: weights {name!r}: unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}"
            )
        if entry.get("file") is not None and entry.get("pretrain") is not None:
            raise ConfigError(f"{source}: weights {name!r}: give either file or pretrain, not both")
        file = entry.get("file")
        try:
            named = isinstance(file, str) and is_weights_name(str(arch), file)
        except WeightsError as exc:
            raise ConfigError(f"{source}: weights {name!r}: {exc}") from exc
        file = file if named or file is None else path(file, f"weights {name!r} file")
        pretrain = _mapping(entry.get("pretrain"), f"weights {name!r} pretrain", source) or None
        if pretrain is not None and pretrain.get("data") is not None:
            pretrain["data"] = str(path(pretrain["data"], f"weights {name!r} pretrain data"))
        weights.append(WeightsSpec(name, str(arch), file, pretrain))
    if not weights:
        raise ConfigError(f"{source}: weights must list at least one backbone")
    _check_unique("weights", [w.name for w in weights], source)

    downstream = []
    for i, entry in enumerate(data.get("downstream") or []):
        entry = _mapping(entry, f"downstream[{i}]", source)
        if unknown := sorted(set(entry) - {"name", "method", "params", "weights"}):
            raise ConfigError(f"{source}: downstream[{i}]: unknown key(s) {unknown}")
        method = entry.get("method")
        if method not in DOWNSTREAM:
            raise ConfigError(
                f"{source}: downstream[{i}]: unknown method {method!r}; choose one of {sorted(DOWNSTREAM)}"
            )
        name = _check_name("downstream", entry.get("name", method), f"{source}: downstream[{i}]")
        only = entry.get("weights")
        if only is not None:
            names = {w.name for w in weights}
            if not isinstance(only, list) or not set(only) <= names:
                raise ConfigError(f"{source}: downstream {name!r}: weights must list names among {sorted(names)}")
            only = tuple(only)
        downstream.append(DownstreamSpec(name, method, _mapping(entry.get("params"), "params", source), only))
    if not downstream:
        raise ConfigError(f"{source}: downstream must list at least one method")
    _check_unique("downstream", [d.name for d in downstream], source)

    def integer(key: str, default: int, minimum: int) -> int:
        value = data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{source}: {key} must be an integer >= {minimum}, got {value!r}")
        return value

    device = data.get("device", "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"{source}: device must be cpu or cuda, got {device!r}")
    report = _mapping(data.get("report"), "report", source)
    return BenchmarkConfig(
        data_root=path(root, "data.root"),
        objects=tuple(objects),
        weights=tuple(weights),
        downstream=tuple(downstream),
        image_size=integer("image_size", 256, 8),
        seed=integer("seed", 0, 0),
        device=str(device),
        batch_size=integer("batch_size", 32, 1),
        figures=bool(report.get("figures", True)),
        title=str(data.get("title", "spotdiff benchmark")),
    )


def load_config(path: str | os.PathLike[str], device: str | None = None) -> BenchmarkConfig:
    """Read and validate a benchmark YAML file; ConfigError names the file. ``device`` overrides its ``device``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: benchmark config not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if device is not None:
        if device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
            raise ConfigError(f"--device {device!r}: choose cpu, cuda or cuda:N")
        if isinstance(data, Mapping):
            data = {**data, "device": device}
    return parse_config(data, path.resolve().parent, source=str(path))
