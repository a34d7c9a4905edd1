"""Validation of a model directory's contents before any tensor work, and of numbers given by a user.

:func:`check_model_config` checks ``config.json`` (types, ranges, required keys) and
:func:`check_model_tensors` the fitted tensors and the feature network against it (shapes, channel
indices, bank width, finiteness), so that a tampered or damaged model is refused with one line
naming the key or tensor, never a traceback and never a NaN that would call every part "normal".
:func:`check_finite` / :func:`check_seed` validate numbers given on the command line or to ``fit``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from spotdiff.errors import ConfigError, WeightsError
from spotdiff.models.arch import ARCHITECTURE_NAMES, LAYER_STRIDES, layer_channels

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
BACKBONE_FILE = "backbone.safetensors"
"""The files of a model directory (written and read by :mod:`spotdiff.detect.store`)."""

MAX_IMAGE_SIDE = 8192
"""Largest model image side in pixels (our choice: 32x VisA's usual 256 px input; a PaDiM at that
size would need terabytes of statistics, so anything larger is a damaged or hostile file)."""
SEED_MAX = 2**32 - 1
"""Largest seed: numpy's legacy ``RandomState`` takes seeds in ``[0, 2**32 - 1]``, the range every
random generator spotdiff seeds accepts."""
MIN_NEIGHBORS = 2
"""Smallest PatchCore ``num_neighbors``: with one neighbour the weight of eq. 7 is
``1 - exp(s*) / exp(s*) = 0``, so every image would score 0 up to rounding."""
_REQUIRED = ("model", "arch", "layers", "seed", "image_size", "n_train", "backbone_source")
_MODEL_KEYS = {"padim": ("d", "epsilon"), "patchcore": ("coreset_ratio", "num_neighbors")}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_finite(value: Any, name: str) -> float:
    """``value`` as a float; :class:`ConfigError` naming ``name`` unless it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {_show(value)}")
    return float(value)


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` unless it is not an integer in ``[0, SEED_MAX]`` (:class:`ConfigError` naming ``name``)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{name} must be an integer in [0, {SEED_MAX}] (2**32 - 1), got {_show(value)}")
    return value


def feature_grid(image_size: tuple[int, int], layer: str) -> tuple[int, int]:
    """``(h, w)`` of a ResNet stage's output for an ``(H, W)`` input: each stride-2 step rounds up."""
    h, w = image_size
    for _ in range(LAYER_STRIDES[layer].bit_length() - 1):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


class _Keys:
    """Checks of one JSON object; every failure is one :class:`WeightsError` line naming the key."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self.data, self.where = data, where

    def fail(self, key: str, problem: str) -> WeightsError:
        value = f" (got {_show(self.data[key])})" if key in self.data else ""
        return WeightsError(f"{self.where}: key {key!r} {problem}{value}")

    def require(self, key: str) -> Any:
        if key not in self.data:
            raise self.fail(key, "is missing")
        return self.data[key]

    def integer(self, key: str, low: int, high: int | None = None, optional: bool = False) -> int | None:
        value = self.data.get(key) if optional else self.require(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise self.fail(key, f"must be an integer {span}" + (" or null" if optional else ""))
        return value

    def number(self, key: str, low: float, high: float, low_open: bool = False) -> float:
        value = self.require(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not (low < value if low_open else low <= value)
            or value > high
        ):
            raise self.fail(key, f"must be a finite number in {'(' if low_open else '['}{low:g}, {high:g}]")
        return float(value)

    def mapping(self, key: str) -> dict[str, Any] | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, dict):
            raise self.fail(key, "must be a JSON object or null")
        return value


def check_model_config(config: Any, where: str) -> None:
    """Raise :class:`WeightsError` (one line naming ``where`` and the key) unless ``config`` is a
    valid ``config.json`` of a PaDiM or PatchCore model; no tensor is touched."""
    from spotdiff.detect.calibration import Calibration

    if not isinstance(config, dict):
        raise WeightsError(f"{where}: must hold a JSON object, got {type(config).__name__}")
    keys = _Keys(config, where)
    for key in _REQUIRED:
        keys.require(key)
    model = config["model"]
    if model not in _MODEL_KEYS:
        raise keys.fail("model", f"must be one of {sorted(_MODEL_KEYS)}")
    if config["arch"] not in ARCHITECTURE_NAMES:
        raise keys.fail("arch", f"must be one of {sorted(ARCHITECTURE_NAMES)}")
    layers = config["layers"]
    order = list(LAYER_STRIDES)
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(x, str) and x in order for x in layers)
        or sorted(set(layers), key=order.index) != layers
    ):
        raise keys.fail("layers", f"must be a non-empty list of distinct stages from {order}, shallow to deep")
    keys.integer("seed", 0, SEED_MAX)
    size = config["image_size"]
    if (
        not isinstance(size, list)
        or len(size) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_IMAGE_SIDE for v in size)
    ):
        raise keys.fail("image_size", f"must be [height, width], integers in [1, {MAX_IMAGE_SIDE}]")
    keys.integer("n_train", 1)
    if not isinstance(config["backbone_source"], str):
        raise keys.fail("backbone_source", "must be a string")
    for key in ("weights", "data_source", "normal_maps"):
        keys.mapping(key)
    stats = config.get("normal_maps")
    if stats:
        inner = _Keys(stats, f"{where}: normal_maps")
        for key in ("map_median", "map_p99", "score_max", "score_mean"):
            inner.number(key, -math.inf, math.inf, low_open=True)
        inner.integer("images", 1)
    if config.get("calibration") is not None:
        if not isinstance(config["calibration"], dict):
            raise keys.fail("calibration", "must be a JSON object or null")
        Calibration.from_dict(config["calibration"], where=f"{where}: calibration", error=WeightsError)
    channels = sum(layer_channels(config["arch"], layers))
    for key in _MODEL_KEYS[model]:
        keys.require(key)
    if model == "padim":
        keys.integer("d", 1, channels)
        keys.number("epsilon", 0.0, math.inf, low_open=True)
    else:
        keys.number("coreset_ratio", 0.0, 1.0, low_open=True)
        keys.integer("num_neighbors", MIN_NEIGHBORS)
        keys.integer("projection_dim", 1, optional=True)
        keys.integer("target_dim", 1, channels, optional=True)
        keys.integer("coreset_shard", 1, optional=True)


def _tensor_problem(name: str, tensor: torch.Tensor, shape: tuple[int, ...] | None, where: str) -> None:
    if shape is not None and tuple(tensor.shape) != shape:
        raise WeightsError(
            f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape} from config.json"
        )
    check_finite_tensor(tensor, name, where)


def check_finite_tensor(tensor: torch.Tensor, name: str, where: str) -> None:
    """:class:`WeightsError` naming the tensor when a floating-point ``tensor`` holds NaN or infinity."""
    import torch  # here: the config checks of this module need no torch

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise WeightsError(f"{where}: tensor {name!r} holds {bad} non-finite value(s) (NaN or infinity)")


def check_model_tensors(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], backbone: Mapping[str, torch.Tensor], model_dir: str
) -> None:
    """Shapes and finiteness of the fitted tensors and feature network against a checked ``config``.

    PaDiM: ``mean`` ``(P, d)`` with ``P`` the ``layers[0]`` grid of ``image_size``, packed ``L^-1``
    ``(P, d (d + 1) / 2)``, ``channel_index`` ``(d,)`` integers, distinct, sorted, within the
    channels of ``layers``. PatchCore: ``memory_bank`` ``(n, C)`` with ``C`` the feature width
    (``target_dim`` or the channels of ``layers``) and ``num_neighbors <= n``.
    """
    import torch

    for name, tensor in backbone.items():
        check_finite_tensor(tensor, name, f"{model_dir}/{BACKBONE_FILE}")
    where = f"{model_dir}/{MODEL_FILE}"
    h, w = feature_grid(tuple(config["image_size"]), config["layers"][0])
    channels = sum(layer_channels(config["arch"], config["layers"]))
    expected = {"padim": ("mean", "inv_cholesky_packed", "channel_index"), "patchcore": ("memory_bank",)}
    names = expected[config["model"]]
    if set(tensors) != set(names):
        raise WeightsError(f"{where}: holds tensors {sorted(tensors)}, expected {list(names)}")
    if config["model"] == "padim":
        d = int(config["d"])
        _tensor_problem("mean", tensors["mean"], (h * w, d), where)
        _tensor_problem("inv_cholesky_packed", tensors["inv_cholesky_packed"], (h * w, d * (d + 1) // 2), where)
        index = tensors["channel_index"]
        if index.is_floating_point() or index.dtype == torch.bool or tuple(index.shape) != (d,):
            raise WeightsError(
                f"{where}: tensor 'channel_index' must be {d} integers, got {index.dtype} {tuple(index.shape)}"
            )
        if d and (int(index.min()) < 0 or int(index.max()) >= channels or not bool((index[1:] > index[:-1]).all())):
            raise WeightsError(
                f"{where}: tensor 'channel_index' must hold distinct sorted channels in "
                f"[0, {channels - 1}] (the channels of {config['layers']} of {config['arch']})"
            )
    else:
        bank = tensors["memory_bank"]
        width = config.get("target_dim") or channels
        if bank.ndim != 2 or bank.shape[1] != width or not bank.is_floating_point():
            raise WeightsError(
                f"{where}: tensor 'memory_bank' has shape {tuple(bank.shape)}, expected (rows, "
                f"{width}): the feature width of {config['layers']}"
                + (f" pooled to target_dim {width}" if config.get("target_dim") else "")
            )
        if bank.shape[0] < int(config["num_neighbors"]):
            raise WeightsError(
                f"{where}: tensor 'memory_bank' has {bank.shape[0]} row(s), fewer than "
                f"num_neighbors = {config['num_neighbors']}"
            )
        check_finite_tensor(bank, "memory_bank", where)
