"""Pre-training configuration: one dataclass, a YAML file and command-line overrides.

Precedence, lowest first: the method's recipe (``PretrainMethod.recipe``) < the YAML file <
overrides (command-line flags and ``--set key=value``). Keys left at ``None`` take the recipe's
value when the run starts (:meth:`PretrainConfig.with_recipe`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from spotdiff import configs
from spotdiff.configs import check_fields, rule
from spotdiff.devices import check_device_name
from spotdiff.errors import ConfigError
from spotdiff.models import ARCHITECTURES
from spotdiff.pretrain.methods import METHODS

if TYPE_CHECKING:
    from spotdiff.pretrain.base import Recipe

T = TypeVar("T")

ARCHS: tuple[str, ...] = tuple(ARCHITECTURES)
AMP_MODES = ("bf16", "fp16", "none")
OPTIMIZERS = ("sgd", "lars")
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

    method: str = field(default="simsiam", metadata=rule(choices=METHODS))
    spd: bool = False
    eta: float = field(default=0.1, metadata=rule(finite=True, minimum=0))
    arch: str = field(default="resnet50", metadata=rule(choices=ARCHS))
    data: str = ""
    out: str = ""
    epochs: int | None = field(default=None, metadata=rule(above=0))
    steps: int | None = field(default=None, metadata=rule(above=0))
    batch_size: int | None = field(default=None, metadata=rule(above=0))
    lr: float | None = field(default=None, metadata=rule(finite=True, minimum=0))
    weight_decay: float | None = field(default=None, metadata=rule(finite=True, minimum=0))
    momentum: float | None = field(default=None, metadata=rule(finite=True, minimum=0))
    optimizer: str | None = field(default=None, metadata=rule(choices=OPTIMIZERS))
    warmup_epochs: float | None = field(default=None, metadata=rule(finite=True, minimum=0))
    image_size: int = field(default=224, metadata=rule(above=0))
    workers: int = field(default=4, metadata=rule(minimum=0))
    amp: str = field(default="bf16", metadata=rule(choices=AMP_MODES))
    device: str = field(default="auto", metadata=rule(check=check_device_name))
    channels_last: bool = True
    seed: int = 0
    checkpoint_every: int = field(default=1000, metadata=rule(minimum=0))
    log_every: int = field(default=10, metadata=rule(above=0))
    resume: bool = False
    weights: str | None = None
    skip_bad: bool = False
    tensorboard: bool = True
    hparams: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ConfigError for a value of the wrong type or out of range (:func:`spotdiff.configs.check_fields`)."""
        check_fields(self, "config")
        if not self.data:
            raise ConfigError("config: data: no image folder given (--data DIR)")
        if not self.out:
            raise ConfigError("config: out: no run directory given (--out RUN_DIR)")

    def with_recipe(self, recipe: Recipe) -> PretrainConfig:
        """A copy with every None recipe key filled from ``recipe`` (a ``Recipe``)."""
        run = self.run_recipe(recipe)
        cfg = dataclasses.replace(
            self,
            optimizer=run.optimizer,
            lr=run.base_lr,
            weight_decay=run.weight_decay,
            momentum=run.momentum,
            batch_size=run.batch_size,
            epochs=run.epochs,
            warmup_epochs=run.warmup_epochs,
        )
        cfg.validate()
        return cfg

    def run_recipe(self, default: Recipe) -> Recipe:
        """The recipe this config runs: each recipe key set here wins over ``default``'s."""
        return dataclasses.replace(
            default,
            optimizer=_pick(self.optimizer, default.optimizer),
            base_lr=_pick(self.lr, default.base_lr),
            weight_decay=_pick(self.weight_decay, default.weight_decay),
            momentum=_pick(self.momentum, default.momentum),
            batch_size=_pick(self.batch_size, default.batch_size),
            epochs=_pick(self.epochs, default.epochs),
            warmup_epochs=_pick(self.warmup_epochs, default.warmup_epochs),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (YAML/JSON/checkpoint-safe)."""
        return dataclasses.asdict(self)


def _pick(value: T | None, default: T) -> T:
    return default if value is None else value


def coerce_value(key: str, value: Any, source: str, from_text: bool = False) -> Any:
    """Check (and, for command-line text, convert) ``value`` for config key ``key`` (:func:`spotdiff.configs.coerce_value`)."""
    return configs.coerce_value(PretrainConfig, key, value, source, from_text)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping of config keys; ConfigError naming the file on any problem."""
    return configs.read_mapping(path, "config file")


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
