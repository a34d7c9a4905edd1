"""``spotdiff benchmark``: a resumable grid of pre-trained weights x downstream methods x objects.

Each *cell* (one weights entry, one downstream entry, one object) is measured once and written
atomically to ``<out>/cells/<weights>__<downstream>__<object>.json``. A cell whose file exists is
skipped, so an interrupted benchmark resumes where it stopped. After the grid, the results are
collected into ``results.csv`` / ``results.json``, ``tables.md`` (the paper's layout: one table per
downstream method and metric, pre-training methods as rows, objects and mean as columns, AU-PR
first) and ``report.html``.

Several processes may share one ``<out>`` (one per GPU, the tasks of a job array, ``--shard I/N``):
``<out>/benchmark.json`` holds the config hash they must agree on, and every cell (and pre-training
block) runs under an exclusive, heartbeat-kept claim in ``<out>/claims`` (:class:`Claims`), so each
runs once and a killed process's cell is taken over. See docs/report.md.

Downstream methods are looked up in :data:`DOWNSTREAM` (name -> runner); a runner takes the
:class:`Cell`, the :class:`BenchmarkConfig` and a scratch folder and returns a :class:`CellOutput`. Tests register
fast fake runners there to check the grid logic.

Config (YAML; relative paths are relative to the config file)::

    data: {root: /data/VisA}          # raw VisA root (or MVTec-style / prepared folder)
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
      - {name: cls-5shot, method: cls, params: {protocol: 5shot}}
    report: {figures: true}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from spotdiff import __version__
from spotdiff.errors import ConfigError, SpotdiffError, WeightsError
from spotdiff.files import create_text_exclusive, write_json_atomic, write_text_atomic
from spotdiff.models import (
    ARCHITECTURES,
    describe_weights,
    file_record,
    is_random,
    is_weights_name,
    load_weights,
    random_init_warning,
    torchvision_weights,
    weights_record,
)
from spotdiff.progress import bar, log
from spotdiff.report.html import Section, report_sections, write_html_report
from spotdiff.report.plots import Predictions
from spotdiff.report.tables import (
    HEADLINE_METRICS,
    ResultRecord,
    Table,
    paper_tables,
    records_csv,
    tables_markdown,
)
from spotdiff.tabular import format_percent

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*(_[A-Za-z0-9.+-]+)*$")  # no "__", filename-safe
CELL_DIR = "cells"
WEIGHTS_DIR = "weights"
WORK_DIR = "work"
CLAIM_DIR = "claims"
RECORD_NAME = "benchmark.json"  # the config hash every process sharing the folder must match
SHARDS_NAME = "shards.json"  # the shard count of ``--shard I/N`` processes
LEASE_SECONDS = 300.0
"""A claim held by a process on another machine is taken over when its heartbeat (the claim file's
mtime, touched every ``lease / 10`` s, at most 30 s) has not moved for this long, as seen by the
process that waits. Claims of this machine are taken over as soon as their process is gone."""
POLL_SECONDS = 5.0  # how often (at most) a process waiting for other processes' cells looks again


# ================================================================================ configuration
@dataclass(frozen=True)
class WeightsSpec:
    """A backbone to evaluate: ``file`` (a path, or a weights name as ``--weights`` takes: ``imagenet``,
    a torchvision weights name, ``random``; None = random init from the seed) or a ``pretrain`` block
    (a :class:`spotdiff.pretrain.PretrainConfig` mapping) run first, exported to
    ``<out>/weights/<name>.safetensors``."""

    name: str
    arch: str
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
    image_size: int = 256
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 32
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
            "params": _jsonable(self.downstream.params),
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


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


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


# ================================================================================ downstream runners
def _run_detector_cell(kind: str, cell: Cell, config: BenchmarkConfig) -> CellOutput:
    """Fit detector ``kind`` (params go to its constructor, except ``split``) and evaluate it."""
    from spotdiff.data import open_dataset
    from spotdiff.detect import DETECTORS
    from spotdiff.detect.evaluate import evaluate_detector

    params = dict(cell.downstream.params)
    split = params.pop("split", "1cls")
    try:
        detector = DETECTORS[kind](
            arch=cell.weights.arch,
            weights=cell.weights_file,
            seed=config.seed,
            batch_size=config.batch_size,
            device=config.device,
            **params,
        )
    except TypeError as exc:
        raise ConfigError(f"downstream {cell.downstream.name!r}: bad params {params} ({exc})") from exc
    train = open_dataset(config.data_root, cell.object, split=split, subset="train", image_size=config.image_size)
    test = open_dataset(config.data_root, cell.object, split=split, subset="test", image_size=config.image_size)
    detector.fit(train)
    metrics, per_image, _, _ = evaluate_detector(detector, test, config.batch_size)
    return CellOutput(
        metrics, [r["score"] for r in per_image], [r["label"] for r in per_image], [r["defect_type"] for r in per_image]
    )


def run_padim_cell(cell: Cell, config: BenchmarkConfig, work_dir: Path) -> CellOutput:
    """PaDiM fitted on the object's normal training images (split ``params.split``, default 1cls)."""
    return _run_detector_cell("padim", cell, config)


def run_patchcore_cell(cell: Cell, config: BenchmarkConfig, work_dir: Path) -> CellOutput:
    """PatchCore fitted on the object's normal training images (split ``params.split``, default 1cls)."""
    return _run_detector_cell("patchcore", cell, config)


def _run_finetune_cell(task: str, cell: Cell, config: BenchmarkConfig, work_dir: Path) -> CellOutput:
    """Fine-tune under ``params.protocol`` on every seed (``params.seeds``, default 5); the cell's
    metrics are the means over seeds, with ``<metric>_std`` the sample std."""
    from spotdiff.finetune import FinetuneConfig, run_finetune

    params = dict(cell.downstream.params)
    try:
        ft = FinetuneConfig(
            task=task,
            data=config.data_root,
            out=work_dir,
            object=cell.object,
            weights=cell.weights_file,
            arch=cell.weights.arch,
            image_size=config.image_size,
            device=config.device,
            **params,
        )
    except TypeError as exc:
        raise ConfigError(f"downstream {cell.downstream.name!r}: bad params {params} ({exc})") from exc
    summary = run_finetune(ft)["aggregate"][cell.object]
    metrics: dict[str, Any] = {}
    for name, stat in summary.items():
        if isinstance(stat, Mapping) and "mean" in stat:
            metrics[name] = stat["mean"]
            metrics[f"{name}_std"] = stat["std"]
    return CellOutput(metrics)


def run_cls_cell(cell: Cell, config: BenchmarkConfig, work_dir: Path) -> CellOutput:
    """2-class classification fine-tuning under ``params.protocol`` (highshot, 5shot, 10shot)."""
    return _run_finetune_cell("cls", cell, config, work_dir)


def run_seg_cell(cell: Cell, config: BenchmarkConfig, work_dir: Path) -> CellOutput:
    """2-class segmentation (U-Net) fine-tuning under ``params.protocol`` (highshot, 5shot, 10shot)."""
    return _run_finetune_cell("seg", cell, config, work_dir)


#: Downstream method name -> runner. Register more (or fakes, in tests) by adding entries.
DOWNSTREAM: dict[str, Runner] = {
    "padim": run_padim_cell,
    "patchcore": run_patchcore_cell,
    "cls": run_cls_cell,
    "seg": run_seg_cell,
}


# ================================================================================ sharing one --out
def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> ``(I, N)`` with ``1 <= I <= N``; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 1/4 (this process runs shard I of N)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= index <= count:
        raise ConfigError(f"--shard {text}: I must be in 1..N with N >= 1, got I={index}, N={count}")
    return index, count


def check_device(device: str) -> None:
    """ConfigError when ``device`` asks for a GPU this machine does not have."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r}: no CUDA device is available here "
            "(torch.cuda.is_available() is False); use --device cpu"
        )
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )


def config_hash(config: BenchmarkConfig) -> str:
    """SHA-256 of the config as plain data, without ``device`` (each process may use its own GPU)."""
    data = config_dict(config)
    data.pop("device")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); delete it when no process is using its folder") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object; delete it when no process is using its folder")
    return data


def bind_out(config: BenchmarkConfig, out: Path) -> None:
    """Record the config hash in ``out/benchmark.json`` (first process), or refuse another config's ``out``."""
    digest = config_hash(config)
    data = config_dict(config)
    data.pop("device")
    path = out / RECORD_NAME
    create_text_exclusive(
        path,
        json.dumps({"config_hash": digest, "config": data, "spotdiff_version": __version__}, indent=2, sort_keys=True)
        + "\n",
    )
    stored = _read_json(path)
    if stored.get("config_hash") != digest:
        old = stored.get("config") if isinstance(stored.get("config"), dict) else {}
        keys = sorted(k for k in set(old) | set(data) if old.get(k) != data.get(k))
        raise ConfigError(
            f"{out}: holds a benchmark of another configuration (config hash "
            f"{str(stored.get('config_hash'))[:12]} in {path}, this one {digest[:12]}; they differ in "
            f"{keys}); use another --out, or delete {path} when no process is using {out} "
            "(finished cells are kept where their fingerprint still matches)"
        )


def bind_shards(out: Path, shard: tuple[int, int]) -> None:
    """Record the shard count in ``out/shards.json`` (first ``--shard`` process), or refuse another count."""
    index, count = shard
    path = out / SHARDS_NAME
    create_text_exclusive(path, json.dumps({"count": count}) + "\n")
    stored = _read_json(path).get("count")
    if stored != count:
        raise ConfigError(
            f"--shard {index}/{count}: {out} is split into {stored} shards ({path}); use --shard "
            f"I/{stored}, or delete {path} when no process is using {out}"
        )


def _process_start(pid: int) -> str | None:
    """Start time (clock ticks since boot) of a live process on Linux; None when gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` of this machine (and pid namespace) still runs; ``start`` guards pid reuse."""
    if Path("/proc/self/stat").exists():
        now = _process_start(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Claims:
    """Exclusive claims on units of work (cells, pre-training blocks, shards) in ``out/claims``.

    A claim is the file ``<key>.<generation>.claim``, created with an exclusive hard link (see
    :func:`spotdiff.files.create_text_exclusive`) and holding the owner's host, pid namespace, pid,
    process start time and a random token. While held, a heartbeat thread touches it every
    ``heartbeat`` seconds. A claim is *stale* when its process is gone (same machine and pid
    namespace) or, for other machines, when its mtime has not moved for ``lease`` seconds of the
    observer's clock (so clocks need not agree). A stale claim of generation ``g`` is taken over by
    creating generation ``g + 1``: only one process can, so a dead process's cell is re-run once.
    Before writing a result the owner checks that its claim is still the latest (:meth:`owns`); an
    owner that was presumed dead (no heartbeat for ``lease`` seconds) discards its result.
    """

    def __init__(self, folder: Path, lease: float = LEASE_SECONDS) -> None:
        if not lease > 0:
            raise ConfigError(f"--lease must be > 0 seconds, got {lease}")
        self.folder = folder
        self.lease = float(lease)
        self.heartbeat = min(30.0, self.lease / 10)
        self.me = {
            "host": socket.gethostname(),
            "pidns": _pid_namespace(),
            "pid": os.getpid(),
            "start": _process_start(os.getpid()),
        }
        self.held: dict[str, tuple[Path, str]] = {}
        self._seen: dict[Path, tuple[int, str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading
    def _generations(self, key: str) -> list[tuple[int, Path]]:
        found = []
        try:
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    stem, dot, gen = entry.name.removesuffix(".claim").rpartition(".")
                    if entry.name.endswith(".claim") and dot and stem == key and gen.isdigit():
                        found.append((int(gen), Path(entry.path)))
        except FileNotFoundError:
            pass
        return sorted(found)

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _local(self, holder: Mapping[str, Any]) -> bool:
        return holder.get("host") == self.me["host"] and holder.get("pidns") == self.me["pidns"]

    def _stale(self, path: Path, holder: Mapping[str, Any]) -> bool:
        if self._local(holder) and isinstance(holder.get("pid"), int):
            return not _alive(holder["pid"], holder.get("start"))
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return False  # released meanwhile: look again later
        token, now = str(holder.get("token")), time.monotonic()
        seen = self._seen.get(path)
        if seen is None or seen[:2] != (mtime, token):
            self._seen[path] = (mtime, token, now)
            return False
        return now - seen[2] >= self.lease

    @staticmethod
    def describe(holder: Mapping[str, Any]) -> str:
        return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"

    # -- claiming
    def claim(self, key: str) -> str | None:
        """Claim ``key``: None when this process now holds it, else a description of the holder."""
        gens = self._generations(key)
        gen = 1
        if gens:
            last, path = gens[-1]
            holder = self._read(path)
            if not self._stale(path, holder):
                return self.describe(holder)
            gen = last + 1
        token = uuid.uuid4().hex
        path = self.folder / f"{key}.{gen}.claim"
        record = {**self.me, "token": token, "key": key, "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
        if not create_text_exclusive(path, json.dumps(record, sort_keys=True) + "\n"):
            return self.describe(self._read(path))
        for _, old in gens:  # the stale predecessors (their owners see that they lost)
            old.unlink(missing_ok=True)
        if gens:
            log(f"{key}: took over the stale claim of {self.describe(self._read(gens[-1][1]) or holder)}")
        with self._lock:
            self.held[key] = (path, token)
        self._start_heartbeat()
        return None

    def owns(self, key: str) -> bool:
        """True while this process's claim on ``key`` is the latest one and still carries its token."""
        path, token = self.held[key]
        gens = self._generations(key)
        return bool(gens) and gens[-1][1] == path and self._read(path).get("token") == token

    def release(self, key: str) -> None:
        """Give up ``key`` (its claim file is removed if it is still this process's)."""
        with self._lock:
            path, token = self.held.pop(key)
        if self._read(path).get("token") == token:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Release every claim and stop the heartbeat."""
        for key in list(self.held):
            self.release(key)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="spotdiff-claims", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._lock:
                paths = [path for path, _ in self.held.values()]
            for path in paths:
                try:
                    os.utime(path)
                except OSError:
                    pass  # released meanwhile, or taken over


def _work_through(
    claims: Claims, units: Sequence[tuple[str, Callable[[], bool], Callable[[], bool]]], what: str, poll: float
) -> list[str]:
    """Run every ``(key, is_done, run)`` unit not yet done, each under its claim; wait for units that
    other processes hold (taking over stale claims). ``run`` returns False when its result was
    discarded (the claim was taken over meanwhile). Returns the keys run (and kept) here."""
    todo = [u for u in units if not u[1]()]
    ran: list[str] = []
    waited = False
    while todo:
        blocked = []
        for key, is_done, run in todo:
            if is_done():
                continue
            holder = claims.claim(key)
            if holder is not None:
                blocked.append((key, is_done, run, holder))
                continue
            try:
                if not is_done() and run():  # is_done: finished by another process before the claim
                    ran.append(key)
            finally:
                claims.release(key)
        todo = [(key, is_done, run) for key, is_done, run, _ in blocked if not is_done()]
        if todo:
            if not waited:
                first = next(b for b in blocked if b[0] == todo[0][0])
                log(f"waiting for {len(todo)} {what} run by other processes (e.g. {first[0]}: {first[3]})")
            waited = True
            time.sleep(poll)
    return ran


# ================================================================================ the grid
def check_weights(config: BenchmarkConfig) -> None:
    """Read every ``file`` weights entry (downloading torchvision weights not cached yet) and check it
    fits its architecture, before anything is written; warn once per entry without weights."""
    for spec in config.weights:
        if spec.pretrain is not None:
            continue
        if isinstance(spec.file, Path) and not spec.file.is_file():
            raise ConfigError(f"weights {spec.name!r}: file not found: {spec.file}")
        if spec.file is None:
            random_init_warning(
                f"weights {spec.name!r} has no file; set file: imagenet for torchvision's "
                "ImageNet weights (file: random hides this warning)"
            )
            continue
        try:
            load_weights(spec.arch, spec.file)
        except WeightsError as exc:
            raise WeightsError(f"weights {spec.name!r}: {exc}") from exc


def weights_files(config: BenchmarkConfig, out: Path) -> dict[str, Path | str | None]:
    """Backbone of every weights entry: None for random init; a torchvision name resolved
    (``imagenet`` -> ``ResNet18_Weights.IMAGENET1K_V1``, so cells fingerprint the weights torchvision
    gave, not the alias); its ``file``; or ``out/weights/<name>.safetensors`` for a ``pretrain`` block."""
    files: dict[str, Path | str | None] = {}
    for spec in config.weights:
        if spec.pretrain is not None:
            files[spec.name] = out / WEIGHTS_DIR / f"{spec.name}.safetensors"
        elif is_random(spec.file):
            files[spec.name] = None
        elif isinstance(spec.file, str):
            files[spec.name] = str(torchvision_weights(spec.arch, spec.file))
        else:
            files[spec.name] = spec.file
    return files


def prepare_weights(
    config: BenchmarkConfig, out: Path, claims: Claims, poll: float = POLL_SECONDS
) -> dict[str, Path | str | None]:
    """Backbone file of every weights entry; runs (or resumes) the ``pretrain`` blocks first.

    A backbone already exported to ``<out>/weights/<name>.safetensors`` is reused when the block
    recorded beside it (``<name>.json``) is the same; a changed block is a ConfigError. Each block
    runs under a claim, so processes sharing ``out`` pre-train it once (the others wait).
    """
    files = weights_files(config, out)
    units = []
    for spec in config.weights:
        if spec.pretrain is None:  # checked by check_weights
            continue
        dest = files[spec.name]
        record = dest.with_suffix(".json")
        block = {"arch": spec.arch, "pretrain": _jsonable(spec.pretrain), "seed": config.seed}

        def done(dest: Path = dest, record: Path = record, block: dict = block) -> bool:
            if not (dest.is_file() and record.is_file()):
                return False
            if _read_json(record) != block:
                raise ConfigError(
                    f"{dest}: pre-trained with another pretrain block; use another --out "
                    f"or delete {dest.name} and {record.name} to re-train"
                )
            return True

        def run(spec: WeightsSpec = spec, dest: Path = dest, record: Path = record, block: dict = block) -> bool:
            pretrain_and_export(spec, config, out / "pretrain" / spec.name, dest)
            write_json_atomic(record, block)
            return True

        if done():
            log(f"weights {spec.name}: already pre-trained ({dest})")
        units.append((f"_weights-{spec.name}", done, run))
    _work_through(claims, units, "pre-training block(s)", poll)
    return files


def pretrain_and_export(spec: WeightsSpec, config: BenchmarkConfig, run_dir: Path, dest: Path) -> None:
    """Run one ``pretrain`` block into ``run_dir`` and export its backbone to ``dest``."""
    from spotdiff.pretrain.config import PretrainConfig
    from spotdiff.pretrain.export import export_backbone
    from spotdiff.pretrain.train import run_pretrain

    block = dict(spec.pretrain or {})
    block.setdefault("arch", spec.arch)
    block.setdefault("seed", config.seed)
    block.setdefault("device", config.device)
    block["out"] = str(run_dir)
    block["resume"] = True
    try:
        pcfg = PretrainConfig(**block)
    except TypeError as exc:
        raise ConfigError(f"weights {spec.name!r}: bad pretrain block ({exc})") from exc
    log(f"weights {spec.name}: pre-training ({pcfg.method}{' + SPD' if pcfg.spd else ''}, {pcfg.arch})")
    export_backbone(run_pretrain(pcfg), dest, arch=spec.arch)


def grid(config: BenchmarkConfig, weights_files: Mapping[str, Path | str | None]) -> list[Cell]:
    """Every cell, ordered weights, then downstream, then object."""
    return [
        Cell(w, d, obj, weights_files.get(w.name, w.file))
        for w in config.weights
        for d in config.downstream
        if d.weights is None or w.name in d.weights
        for obj in config.objects
    ]


def shard_cells(cells: Sequence[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """The cells of shard ``(I, N)``: every N-th cell of the grid, starting with cell I (1-based)."""
    if shard is None:
        return list(cells)
    index, count = shard
    return [cell for i, cell in enumerate(cells) if i % count == index - 1]


def cell_path(out: Path, cell: Cell) -> Path:
    return out / CELL_DIR / f"{cell.key}.json"


def read_cell(path: Path, cell: Cell, config: BenchmarkConfig) -> dict[str, Any] | None:
    """The stored result of ``cell``, or None when not yet measured.

    A file for another configuration (different fingerprint) or an unreadable file is an error:
    the user chooses between a fresh ``--out`` and deleting it.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        stored = data["fingerprint"]
        data["metrics"]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable cell result ({exc}); delete it to re-run the cell") from exc
    if stored != _jsonable(cell.fingerprint(config)):
        raise ConfigError(
            f"{path}: measured with another configuration; use another --out or delete the file to re-run the cell"
        )
    return data


def run_cell(cell: Cell, config: BenchmarkConfig, out: Path, claims: Claims | None = None) -> dict[str, Any] | None:
    """Measure one cell and write its JSON atomically; returns the stored dict.

    With ``claims`` (this process holds the cell's claim), the result is written only if the claim
    is still this process's; otherwise it is discarded and None is returned.
    """
    runner = DOWNSTREAM.get(cell.downstream.method)
    if runner is None:
        raise ConfigError(f"no runner registered for downstream method {cell.downstream.method!r}")
    start = time.perf_counter()
    output = runner(cell, config, out / WORK_DIR / cell.key)
    data = {
        "key": cell.key,
        "weights": cell.weights.name,
        "downstream": cell.downstream.name,
        "object": cell.object,
        "metrics": _jsonable(output.metrics),
        "seconds": round(time.perf_counter() - start, 3),
        "scores": None if output.scores is None else [float(s) for s in output.scores],
        "labels": None if output.labels is None else [int(v) for v in output.labels],
        "defect_types": None if output.defect_types is None else [str(t) for t in output.defect_types],
        "init_weights": weights_record(cell.weights.arch, cell.weights_file),
        "fingerprint": cell.fingerprint(config),
        "spotdiff_version": __version__,
    }
    if claims is not None and not claims.owns(cell.key):
        log(
            f"{cell.key}: another process took this cell over while it ran (no heartbeat seen for "
            f"{claims.lease:g} s); this result is discarded"
        )
        return None
    write_json_atomic(cell_path(out, cell), data)
    return data


@dataclass
class BenchmarkResult:
    """What a benchmark run produced: the stored cell dicts (grid order; empty when the tables were
    not written by this process), the cells it ran and found done, and how many grid cells are missing."""

    cells: list[dict[str, Any]]
    ran: list[str]
    skipped: list[str]
    tables: list[Table]
    out: Path
    missing: int = 0


def run_benchmark(
    config: BenchmarkConfig,
    out: str | os.PathLike[str],
    shard: tuple[int, int] | None = None,
    lease: float = LEASE_SECONDS,
) -> BenchmarkResult:
    """Run (or resume) the grid, or shard ``(I, N)`` of it, then write the tables when the grid is complete.

    Several processes may share ``out`` (one per GPU, the tasks of a cluster job array): each cell
    runs under a claim (:class:`Claims`), so it runs once, and a killed process's cell is taken over.
    Without ``shard`` a process runs any cell not yet claimed and waits for the cells other
    processes hold; with ``shard`` it runs only the cells of its shard. The tables (results.csv/json,
    tables.md, report.html) are written by a process that sees every cell of the grid done at its end.
    """
    out = Path(out)
    claims = Claims(out / CLAIM_DIR, lease)
    poll = min(POLL_SECONDS, claims.heartbeat)
    check_device(config.device)
    check_weights(config)
    out.mkdir(parents=True, exist_ok=True)
    bind_out(config, out)
    if shard is not None:
        bind_shards(out, shard)
    try:
        if shard is not None:
            holder = claims.claim(f"_shard-{shard[0]}-of-{shard[1]}")
            if holder is not None:
                raise ConfigError(
                    f"--shard {shard[0]}/{shard[1]} is already being run by {holder} "
                    f"(claim in {out / CLAIM_DIR}); give each process its own shard"
                )
        cells = grid(config, prepare_weights(config, out, claims, poll))
        mine = shard_cells(cells, shard)
        done_before = [c.key for c in mine if read_cell(cell_path(out, c), c, config) is not None]
        if done_before:
            log(f"skipped {len(done_before)} cell(s) already measured in {out / CELL_DIR}")
        progress_bar = bar(total=len(mine), initial=len(done_before), desc="benchmark", unit="cell")
        try:

            def unit(cell: Cell) -> tuple[str, Callable[[], bool], Callable[[], bool]]:
                def run() -> bool:
                    progress_bar.set_postfix_str(cell.key)
                    try:
                        data = run_cell(cell, config, out, claims)
                    except SpotdiffError as exc:
                        raise type(exc)(f"cell {cell.key}: {exc}") from exc
                    if data is None:
                        return False
                    log(f"{cell.key}: {_headline(data['metrics'])} ({data['seconds']:.1f} s)")
                    progress_bar.update(1)
                    return True

                return cell.key, cell_path(out, cell).is_file, run

            ran = _work_through(claims, [unit(c) for c in mine], "cell(s)", poll)
        finally:
            progress_bar.close()
        skipped = [c.key for c in mine if c.key not in ran]
        missing = sum(not cell_path(out, c).is_file() for c in cells)
        if missing:
            log(
                f"{missing} cell(s) of other shards are not done yet; the process that finishes the last "
                "one writes the tables (or run `spotdiff benchmark --collect` when all are done)"
            )
            return BenchmarkResult([], ran, skipped, [], out, missing)
        holder = claims.claim("_tables")
        if holder is not None:
            log(f"every cell is done; the tables are being written by {holder}")
            return BenchmarkResult([], ran, skipped, [], out, 0)
        done = [read_cell(cell_path(out, c), c, config) for c in cells]
        tables = write_results(config, done, out)
        return BenchmarkResult(done, ran, skipped, tables, out, 0)
    finally:
        claims.close()


def collect_benchmark(config: BenchmarkConfig, out: str | os.PathLike[str]) -> BenchmarkResult:
    """Write the tables of ``out`` from the cells measured so far (runs nothing); ``missing`` counts the rest."""
    out = Path(out)
    if not (out / RECORD_NAME).is_file():
        raise ConfigError(f"{out}: no benchmark here ({RECORD_NAME} not found)")
    bind_out(config, out)
    cells = grid(config, weights_files(config, out))
    done = [d for d in (read_cell(cell_path(out, c), c, config) for c in cells) if d is not None]
    if not done:
        raise ConfigError(f"{out}: no cell is done yet; nothing to collect")
    tables = write_results(config, done, out)
    return BenchmarkResult(done, [], [d["key"] for d in done], tables, out, len(cells) - len(done))


def _headline(metrics: Mapping[str, Any]) -> str:
    parts = []
    for key in ("image_aupr", "image_auroc", "pixel_aupro"):
        value = metrics.get(key)
        if isinstance(value, int | float) and not np.isnan(value):
            parts.append(f"{key} {format_percent(value)}")
    return ", ".join(parts) or "done"


def cell_records(cells: Sequence[Mapping[str, Any]]) -> list[ResultRecord]:
    """Result records (method = weights name) of stored cells."""
    return [ResultRecord(c["object"], c["weights"], c["downstream"], c["metrics"]) for c in cells]


def write_results(config: BenchmarkConfig, cells: Sequence[Mapping[str, Any]], out: Path) -> list[Table]:
    """results.csv, results.json, tables.md and report.html from the stored cells; returns the tables."""

    records = cell_records(cells)
    weights_order = [w.name for w in config.weights]
    used = {c["weights"]: cell_weights(c) for c in cells}
    notes = {name: "random init" for name, record in used.items() if record["name"] == "random"}
    tables: list[Table] = []
    for ds in config.downstream:
        mine = [r for r in records if r.downstream == ds.name]
        methods = [w for w in weights_order if any(r.method == w for r in mine)]
        tables += paper_tables(
            mine, objects=list(config.objects), methods=methods, title_prefix=f"{ds.name}: ", notes=notes
        )
    seconds = [c.get("seconds") for c in cells]
    write_text_atomic(out / "results.csv", records_csv(records, extra={"seconds": seconds}))
    write_json_atomic(
        out / "results.json",
        {
            "title": config.title,
            "objects": list(config.objects),
            "metrics": list(HEADLINE_METRICS),
            "cells": [{k: c[k] for k in ("weights", "downstream", "object", "metrics", "seconds")} for c in cells],
            "tables": [t.to_json() for t in tables],
        },
    )
    write_text_atomic(
        out / "tables.md", f"# {config.title}\n\nValues are percentages with one decimal.\n\n" + tables_markdown(tables)
    )
    predictions = []
    if config.figures:
        predictions = [
            Predictions(
                f"{c['downstream']}: {c['object']}",
                c["weights"],
                np.asarray(c["scores"]),
                np.asarray(c["labels"]),
                c.get("defect_types"),
            )
            for c in cells
            if c.get("scores") is not None and c.get("labels") is not None
        ]
    intro = (
        f"{len(cells)} cells: {len(config.weights)} weights x {len(config.downstream)} downstream methods x "
        f"{len(config.objects)} objects. Data: {config.data_root}. Rows: pre-trained weights; "
        "columns: objects and their mean (given only when every object was measured)."
    )
    provenance = [f"{w.name} ({w.arch}): {describe_weights(used[w.name])}" for w in config.weights if w.name in used]
    sections = [*report_sections(tables, predictions), Section("Backbone weights", provenance)]
    write_html_report(out / "report.html", config.title, sections, intro=intro)
    return tables


def cell_weights(cell: Mapping[str, Any]) -> dict[str, Any]:
    """The weights record of a stored cell; cells stored before records existed get one from their
    fingerprint (random init when it names no file)."""
    return dict(cell.get("init_weights") or file_record(cell.get("fingerprint", {}).get("weights_file")))


def config_dict(config: BenchmarkConfig) -> dict[str, Any]:
    """The config as plain data (for logs and tests)."""
    return _jsonable(dataclasses.asdict(config))
