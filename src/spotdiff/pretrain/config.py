"""Pre-training configuration: one dataclass, a YAML file and command-line overrides.

Precedence, lowest first: the method's recipe (``PretrainMethod.recipe``) < the YAML file <
overrides (command-line flags and ``--set key=value``). Keys left at ``None`` take the recipe's
value when the run starts (:meth:`PretrainConfig.with_recipe`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spotdiff.errors import ConfigError
from spotdiff.models import ARCHITECTURES
from spotdiff.pretrain.methods import METHODS

ARCHS: tuple[str, ...] = tuple(ARCHITECTURES)
AMP_MODES = ("bf16", "fp16", "none")
OPTIMIZERS = ("sgd", "lars")
DEVICES = ("auto", "cpu", "cuda")
# Fields taken from the method's recipe when left at None.
RECIPE_KEYS = ("optimizer", "lr", "weight_decay", "momentum", "batch_size", "epochs", "warmup_epochs")
# Fields that may change between a run and its resumption (they do not change the numbers).
RESUMABLE_CHANGES = ("workers", "checkpoint_every", "log_every", "resume", "tensorboard", "out", "data")


@dataclass
class PretrainConfig:
    """Everything one pre-training run depends on; saved in every checkpoint.

    Attributes:
        method: ``simsiam``, ``moco``, ``simclr`` or ``supervised``.
        spd: add the SPot-the-Difference loss (SmoothBlend views) with weight ``eta``.
        arch: torchvision backbone (``resnet18``, ``resnet50``, ``wide_resnet50_2``).
        data: image folder (class subfolders give labels, needed by ``supervised``).
        out: run directory (checkpoint, logs, exported backbone).
        epochs / steps: training length; ``steps`` (optimizer steps), when set, wins.
        batch_size: global batch (all processes together), images per optimizer step.
        lr: learning rate per 256 images; the run uses ``lr * batch_size / 256``.
        warmup_epochs: linear warm-up length before the cosine decay, in epochs.
        image_size: side of the square training views, pixels.
        workers: data-loading processes per training process (0 = load in the main process).
        amp: mixed precision on GPU (``bf16``, ``fp16`` with loss scaling, ``none``); CPU runs fp32.
        seed: seeds model init, data order, augmentations and SPD blending.
        checkpoint_every: write ``checkpoint.pt`` every this many steps (0 = only at the end).
        log_every: one CSV/TensorBoard row every this many steps.
        resume: continue from ``out/checkpoint.pt`` when it exists.
        weights: initial backbone weights: ``imagenet`` (torchvision's), a torchvision weights name,
            a ``.safetensors``/``.pth`` file, or None / ``random`` for random init.
        skip_bad: drop unreadable images (with a warning) instead of stopping.
        hparams: method hyper-parameters passed to ``build_method`` (e.g. ``{"dim": 2048}``).
    """

    method: str = "simsiam"
    spd: bool = False
    eta: float = 0.1
    arch: str = "resnet50"
    data: str = ""
    out: str = ""
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    optimizer: str | None = None
    warmup_epochs: float | None = None
    image_size: int = 224
    workers: int = 4
    amp: str = "bf16"
    device: str = "auto"
    channels_last: bool = True
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 10
    resume: bool = False
    weights: str | None = None
    skip_bad: bool = False
    tensorboard: bool = True
    hparams: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ConfigError for a value of the wrong type or out of range."""
        non_negative = ("lr", "weight_decay", "momentum", "warmup_epochs", "eta")
        for name in _FIELDS:
            value = coerce_value(name, getattr(self, name), "config")
            if isinstance(value, float) and not math.isfinite(value):
                allowed = " >= 0" if name in non_negative else ""
                raise ConfigError(f"{name}: must be a finite number{allowed}, got {value}")

        def choose(key: str, options: tuple[str, ...]) -> None:
            if getattr(self, key) not in options:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(options)}")

        choose("method", METHODS)
        choose("arch", ARCHS)
        choose("amp", AMP_MODES)
        choose("device", DEVICES)
        if self.optimizer is not None:
            choose("optimizer", OPTIMIZERS)
        if not self.data:
            raise ConfigError("data: no image folder given (--data DIR)")
        if not self.out:
            raise ConfigError("out: no run directory given (--out RUN_DIR)")
        positive = ("epochs", "steps", "batch_size", "image_size")
        for key in positive:
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key}: must be positive, got {value}")
        for key in non_negative:
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"{key}: must be a finite number >= 0, got {value}")
        for key in ("workers", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.log_every <= 0:
            raise ConfigError(f"log_every: must be positive, got {self.log_every}")

    def with_recipe(self, recipe: Any) -> PretrainConfig:
        """A copy with every None recipe key filled from ``recipe`` (a ``Recipe``)."""
        filled = {
            "optimizer": recipe.optimizer,
            "lr": recipe.base_lr,
            "weight_decay": recipe.weight_decay,
            "momentum": recipe.momentum,
            "batch_size": recipe.batch_size,
            "epochs": recipe.epochs,
            "warmup_epochs": recipe.warmup_epochs,
        }
        updates = {k: v for k, v in filled.items() if getattr(self, k) is None}
        cfg = dataclasses.replace(self, **updates)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (YAML/JSON/checkpoint-safe)."""
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}
_TYPES = typing.get_type_hints(PretrainConfig)
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _base_types(tp: Any) -> tuple[tuple[type, ...], bool]:
    """(accepted builtin types, None allowed) of a field annotation."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        base = tuple(a for a in args if a is not type(None))
        return tuple(typing.get_origin(a) or a for a in base), type(None) in args
    return (typing.get_origin(tp) or tp,), False


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(_FIELDS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce_value(key: str, value: Any, source: str, from_text: bool = False) -> Any:
    """Check (and, for command-line text, convert) ``value`` for config key ``key``.

    Args:
        source: where the value came from, for error messages (a file name or ``--set``).
        from_text: ``value`` is a command-line string to be parsed into the field's type.
    """
    if key not in _FIELDS:
        raise ConfigError(f"{source}: unknown key {key!r}{_suggest(key)}; known keys: {', '.join(_FIELDS)}")
    accepted, optional = _base_types(_TYPES[key])
    if from_text and isinstance(value, str):
        text = value.strip()
        if optional and text.lower() in ("none", "null", "~", ""):
            return None
        try:
            if bool in accepted:
                if text.lower() not in _TRUE | _FALSE:
                    raise ValueError(text)
                return text.lower() in _TRUE
            if int in accepted:
                return int(text)
            if float in accepted:
                return float(text)
            if dict in accepted:
                value = yaml.safe_load(text)
            else:
                return text
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"{source}: {key}={value!r} is not a valid {_type_name(accepted)}") from exc
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} may not be empty (expected {_type_name(accepted)})")
    if isinstance(value, bool) and bool not in accepted:
        raise ConfigError(f"{source}: {key}={value!r} is not a valid {_type_name(accepted)}")
    if float in accepted and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, accepted):
        raise ConfigError(f"{source}: {key}={value!r} is not a valid {_type_name(accepted)}")
    if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{source}: {key} must map names to values")
    return value


def _type_name(accepted: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in accepted)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping of config keys; ConfigError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _merge(values: dict[str, Any], updates: dict[str, Any], source: str = "--set") -> None:
    """Apply ``updates`` (one source) in place; setting one of epochs/steps clears the other."""
    if updates.get("epochs") is not None and updates.get("steps") is not None:
        raise ConfigError(f"{source}: set either epochs or steps, not both")
    for key, value in updates.items():
        if key == "hparams":
            values["hparams"] = {**values.get("hparams", {}), **value}
            continue
        values[key] = value
        if key == "epochs" and value is not None:
            values["steps"] = None
        if key == "steps" and value is not None:
            values["epochs"] = None


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """``["key=value", "hparams.dim=128"]`` -> checked override dict (ConfigError on bad items)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        if key.startswith("hparams."):
            name = key.removeprefix("hparams.")
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"--set {item!r}: cannot parse value ({exc})") from exc
            out.setdefault("hparams", {})[name] = value
            continue
        _merge(out, {key: coerce_value(key, text, "--set", from_text=True)})
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> PretrainConfig:
    """Build a :class:`PretrainConfig` from defaults, an optional YAML file and overrides.

    Later sources win: the YAML file, then ``overrides`` (e.g. command-line flags), then ``sets``
    (``["key=value", "hparams.dim=128"]`` strings parsed to each key's type). Values are
    type-checked; unknown keys raise :class:`ConfigError` naming the key and its source. Recipe
    keys left unset stay None until :meth:`PretrainConfig.with_recipe`.
    """
    values: dict[str, Any] = {}
    if path is not None:
        source = str(path)
        _merge(values, {k: coerce_value(str(k), v, source) for k, v in read_yaml(path).items()}, source)
    if overrides:
        _merge(values, {k: coerce_value(k, v, "override") for k, v in overrides.items()}, "override")
    _merge(values, parse_set_options(list(sets)))
    return PretrainConfig(**values)


def config_differences(saved: dict[str, Any], current: PretrainConfig) -> list[str]:
    """``key: saved -> current`` for every key (except RESUMABLE_CHANGES) that differs."""
    now = current.to_dict()
    return [
        f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]
    ]
