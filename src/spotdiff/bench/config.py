"""The benchmark's YAML config: :func:`load_config` reads and checks it into a :class:`BenchmarkConfig`.

Config (YAML; relative paths are relative to the config file)::

    data: {root: /data/VisA}          # raw VisA root (or MVTec-style / prepared folder)
    objects: [candle, capsules]
    image_size: 256
    seed: 0
    device: auto                      # auto (cuda when available) | cpu | cuda | cuda:N
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
      - {name: cls-5shot, method: cls, params: {protocol: 5shot}}
    report: {figures: true}

Types, unknown keys, ranges and the device come from :mod:`spotdiff.configs` (the one mechanism of
every command, with the rules on the fields of :mod:`spotdiff.bench.schema`); this module adds what
is the benchmark's own: names, paths against the config's folder, and how the entries refer to each other.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spotdiff.bench.cells import DOWNSTREAM
from spotdiff.bench.schema import BenchmarkConfig, DownstreamSpec, WeightsSpec
from spotdiff.configs import build, read_mapping, refuse_unknown
from spotdiff.devices import check_device_name
from spotdiff.errors import ConfigError, WeightsError
from spotdiff.models import is_weights_name

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*(_[A-Za-z0-9.+-]+)*$")  # no "__", filename-safe
YAML_KEYS = (
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
)


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


def _path(value: Any, what: str, base_dir: Path, source: str) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(f"{source}: {what} must be a path, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def _weights(entry: Any, i: int, base_dir: Path, source: str) -> WeightsSpec:
    """One ``weights`` entry: a file (path or weights name) or a pretrain block."""
    where = f"{source}: weights[{i}]"
    entry = _mapping(entry, f"weights[{i}]", source)
    name = _check_name("weights", entry.get("name"), where)
    spec = build(WeightsSpec, entry, where)
    if spec.file is not None and spec.pretrain is not None:
        raise ConfigError(f"{source}: weights {name!r}: give either file or pretrain, not both")
    file = spec.file
    try:
        named = isinstance(file, str) and is_weights_name(spec.arch, file)
    except WeightsError as exc:
        raise ConfigError(f"{source}: weights {name!r}: {exc}") from exc
    file = file if named or file is None else _path(file, f"weights {name!r} file", base_dir, source)
    pretrain = dict(spec.pretrain) if spec.pretrain else None
    if pretrain is not None and pretrain.get("data") is not None:
        pretrain["data"] = str(_path(pretrain["data"], f"weights {name!r} pretrain data", base_dir, source))
    return dataclasses.replace(spec, file=file, pretrain=pretrain)


def _downstream(entry: Any, i: int, weights: list[str], source: str) -> DownstreamSpec:
    """One ``downstream`` entry: a method of :data:`DOWNSTREAM` (its name by default), its params, its weights."""
    where = f"{source}: downstream[{i}]"
    entry = _mapping(entry, f"downstream[{i}]", source)
    method = entry.get("method")
    if method not in DOWNSTREAM:
        raise ConfigError(f"{where}: unknown method {method!r}; choose one of {sorted(DOWNSTREAM)}")
    entry.setdefault("name", method)
    name = _check_name("downstream", entry["name"], where)
    spec = build(DownstreamSpec, {**entry, "params": entry.get("params") or {}}, where)
    if spec.weights is not None and not set(spec.weights) <= set(weights):
        raise ConfigError(f"{source}: downstream {name!r}: weights must list names among {sorted(weights)}")
    return spec


def parse_config(data: Mapping[str, Any], base_dir: Path, source: str = "config") -> BenchmarkConfig:
    """Check a config mapping (see module docstring); relative paths resolve against ``base_dir``."""
    data = _mapping(data, "the config", source)
    refuse_unknown(data, YAML_KEYS, source)
    root = _mapping(data.get("data"), "data", source).get("root")
    if root is None:
        raise ConfigError(f"{source}: data.root (the dataset root) is required")
    objects = data.get("objects")
    if not isinstance(objects, list) or not objects or not all(isinstance(o, str) for o in objects):
        raise ConfigError(f"{source}: objects must be a non-empty list of object names")
    for obj in objects:
        _check_name("object", obj, source)
    weights = [_weights(entry, i, base_dir, source) for i, entry in enumerate(data.get("weights") or [])]
    if not weights:
        raise ConfigError(f"{source}: weights must list at least one backbone")
    _check_unique("weights", [w.name for w in weights], source)
    names = [w.name for w in weights]
    downstream = [_downstream(entry, i, names, source) for i, entry in enumerate(data.get("downstream") or [])]
    if not downstream:
        raise ConfigError(f"{source}: downstream must list at least one method")
    _check_unique("downstream", [d.name for d in downstream], source)
    report = _mapping(data.get("report"), "report", source)
    refuse_unknown(report, ("figures",), f"{source}: report")
    scalars: dict[str, Any] = {k: data[k] for k in ("image_size", "seed", "device", "batch_size", "title") if k in data}
    fields: dict[str, Any] = {"data_root": _path(root, "data.root", base_dir, source), "objects": objects, **scalars}
    return build(BenchmarkConfig, {**fields, "weights": weights, "downstream": downstream, **report}, source)


def load_config(path: str | os.PathLike[str], device: str | None = None) -> BenchmarkConfig:
    """Read and check a benchmark YAML file; ConfigError names the file. ``device`` overrides its ``device``."""
    path = Path(path)
    data = read_mapping(path, "benchmark config")
    if device is not None:
        data["device"] = check_device_name(device, "--device")
    return parse_config(data, path.resolve().parent, source=str(path))
