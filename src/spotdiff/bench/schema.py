"""The benchmark's data types: the grid's entries (:class:`WeightsSpec`, :class:`DownstreamSpec`), the
whole validated grid (:class:`BenchmarkConfig`), one :class:`Cell` and what a runner returns (:class:`CellOutput`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotdiff.configs import rule
from spotdiff.devices import check_device_name
from spotdiff.errors import ConfigError
from spotdiff.models import ARCHITECTURES


def _check_arch(arch: str, what: str) -> str:
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{what.removesuffix(': arch')}: unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}"
        )
    return arch


@dataclass(frozen=True)
class WeightsSpec:
    """A backbone to evaluate: ``file`` (a path, or a weights name as ``--weights`` takes: ``imagenet``,
    a torchvision weights name, ``random``; None = random init from the seed) or a ``pretrain`` block
    (a :class:`spotdiff.pretrain.PretrainConfig` mapping) run first, exported to
    ``<out>/weights/<name>.safetensors``."""

    name: str
    arch: str = field(default="resnet18", metadata=rule(check=_check_arch))
    file: Path | str | None = None
    pretrain: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class DownstreamSpec:
    """A downstream method: ``method`` is a key of :data:`DOWNSTREAM`, ``params`` its options;
    ``weights`` restricts it to those weights names (None = all)."""

    name: str
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    weights: tuple[str, ...] | None = None


@dataclass(frozen=True)
class BenchmarkConfig:
    """The whole grid. ``data_root`` is the dataset root handed to :func:`spotdiff.data.open_dataset`."""

    data_root: Path
    objects: tuple[str, ...]
    weights: tuple[WeightsSpec, ...]
    downstream: tuple[DownstreamSpec, ...]
    image_size: int = field(default=256, metadata=rule(minimum=8))
    seed: int = field(default=0, metadata=rule(minimum=0))
    device: str = field(default="auto", metadata=rule(check=check_device_name))  # devices.resolve_device's names
    batch_size: int = field(default=32, metadata=rule(minimum=1))
    figures: bool = True
    title: str = "spotdiff benchmark"


@dataclass(frozen=True)
class Cell:
    """One grid cell; ``weights_file`` is the resolved backbone file or torchvision weights name
    (None = random init)."""

    weights: WeightsSpec
    downstream: DownstreamSpec
    object: str
    weights_file: Path | str | None

    @property
    def key(self) -> str:
        return f"{self.weights.name}__{self.downstream.name}__{self.object}"

    def fingerprint(self, config: BenchmarkConfig) -> dict[str, Any]:
        """What the cell's numbers depend on; a stored cell with another fingerprint is stale."""
        return {
            "weights": self.weights.name,
            "arch": self.weights.arch,
            "weights_file": None if self.weights_file is None else str(self.weights_file),
            "downstream": self.downstream.name,
            "method": self.downstream.method,
            "params": jsonable(self.downstream.params),
            "object": self.object,
            "data_root": str(config.data_root),
            "image_size": config.image_size,
            "seed": config.seed,
        }


@dataclass
class CellOutput:
    """What a downstream runner measured: ``metrics`` (fractions, from :func:`spotdiff.metrics.evaluate`;
    may hold extra keys such as ``*_std``) and optionally the per-image test ``scores``, ``labels``
    and ``defect_types`` (kept for the report's curves)."""

    metrics: dict[str, Any]
    scores: Sequence[float] | None = None
    labels: Sequence[int] | None = None
    defect_types: Sequence[str] | None = None


#: A downstream runner: ``runner(cell, config, work_dir) -> CellOutput``; ``work_dir`` is a scratch
#: folder of the cell (``<out>/work/<cell key>``) for whatever the method writes on the way.
Runner = Callable[[Cell, BenchmarkConfig, Path], CellOutput]


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def config_dict(config: BenchmarkConfig) -> dict[str, Any]:
    """The config as plain data (for logs and tests)."""
    return jsonable(dataclasses.asdict(config))
