"""One configuration mechanism for every command: a mapping (YAML, JSON, command-line values) -> a checked dataclass.

A config is a dataclass; its annotations give each key's type, its defaults the defaults, and
``field(metadata=rule(...))`` the key's choices, range or own check. :func:`build` refuses unknown
keys (naming the key, the closest known one and the source), coerces values to the annotated types
(ints to floats, strings to paths, lists to tuples; strings from the command line to anything with
``from_text``) and checks every rule (:func:`check_fields`). Every error is one
:class:`~spotdiff.errors.ConfigError` line, ``<source>: <key>...``. Used by ``pretrain``, ``finetune``
and ``bench`` (docs/architecture.md, "One configuration mechanism").
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from spotdiff.errors import ConfigError

T = TypeVar("T")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_RULE = "spotdiff_rule"


@dataclass(frozen=True)
class Rule:
    """What a value must be beyond its type: one of ``choices`` (a tuple, or a function giving it when
    checked), ``>= minimum``, ``> above``, finite, and ``check(value, what) -> value`` (raises ConfigError)."""

    choices: tuple[Any, ...] | Callable[[], Iterable[Any]] | None = None
    minimum: float | None = None
    above: float | None = None
    finite: bool = False
    check: Callable[[Any, str], Any] | None = None


def named_check(check: Callable[[Any], object]) -> Callable[[Any, str], Any]:
    """A ``Rule.check`` from a one-argument check that raises ConfigError (e.g. ``check_arch``): the
    value passes unchanged, or the error is raised again with the field's ``what`` in front."""

    def run(value: Any, what: str) -> Any:
        try:
            check(value)
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}") from None
        return value

    return run


def rule(**kwargs: Any) -> dict[str, Rule]:
    """Field metadata: ``field(default=1, metadata=rule(minimum=1))`` (keywords of :class:`Rule`)."""
    return {_RULE: Rule(**kwargs)}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base_types(tp: Any) -> tuple[tuple[type, ...], bool]:
    """(accepted builtin types, None allowed) of an annotation; ``Mapping``/``tuple`` origins for generics."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        base = tuple(a for a in args if a is not type(None))
        return tuple(typing.get_origin(a) or a for a in base), type(None) in args
    if tp is Any:
        return (object,), True
    return (typing.get_origin(tp) or tp,), False


def _type_name(accepted: tuple[type, ...]) -> str:
    names = {"Mapping": "mapping", "dict": "mapping", "tuple": "list", "Path": "path"}
    return " or ".join(dict.fromkeys(names.get(t.__name__, t.__name__) for t in accepted))


def refuse_unknown(keys: Iterable[Any], known: Iterable[str], source: str) -> None:
    """ConfigError naming the first key of ``keys`` not in ``known`` (with the closest known key)."""
    known = list(known)
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}; known keys: {', '.join(known)}")


def _from_text(key: str, text: str, accepted: tuple[type, ...], optional: bool, source: str) -> Any:
    """A command-line string parsed to the field's type (``none``/``null``/``~``/empty: None when allowed)."""
    stripped = text.strip()
    if optional and stripped.lower() in ("none", "null", "~", ""):
        return None
    try:
        if bool in accepted:
            if stripped.lower() not in _TRUE | _FALSE:
                raise ValueError(text)
            return stripped.lower() in _TRUE
        if int in accepted:
            return int(stripped)
        if float in accepted:
            return float(stripped)
        if any(t in accepted for t in (dict, Mapping, tuple, list)):
            return yaml.safe_load(stripped)
        return text
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{source}: {key}={text!r} is not a valid {_type_name(accepted)}") from exc


def coerce_value(cls: type, key: str, value: Any, source: str, from_text: bool = False) -> Any:
    """``value`` checked (and converted) for field ``key`` of dataclass ``cls``.

    Args:
        source: where the value came from, for messages (a file name, ``--set``, ``config``).
        from_text: ``value`` is a command-line string to be parsed into the field's type.
    """
    hints = field_types(cls)
    refuse_unknown([key], hints, source)
    accepted, optional = _base_types(hints[key])
    bad = f"{source}: {key}={value!r} is not a valid {_type_name(accepted)}"
    if from_text and isinstance(value, str):
        value = _from_text(key, value, accepted, optional, source)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} may not be empty (expected {_type_name(accepted)})")
    if object in accepted:
        return value
    if isinstance(value, bool) and bool not in accepted:
        raise ConfigError(bad)
    if float in accepted and isinstance(value, int) and not isinstance(value, bool | float):
        return float(value)
    if Path in accepted and not isinstance(value, str | Path) and isinstance(value, os.PathLike):
        return Path(value)
    if Path in accepted and str not in accepted and isinstance(value, str):
        return Path(value)
    if tuple in accepted and isinstance(value, list):
        value = tuple(value)
    if (dict in accepted or Mapping in accepted) and isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{source}: {key} must map names to values")
        return dict(value) if dict in accepted else value
    if not isinstance(value, accepted):
        raise ConfigError(bad)
    return value


def _range_text(r: Rule) -> str:
    parts = [f">= {r.minimum:g}" if r.minimum is not None else "", f"> {r.above:g}" if r.above is not None else ""]
    bounds = " and ".join(p for p in parts if p)
    return ("a finite number " if r.finite else "") + bounds


def check_value(key: str, value: Any, r: Rule, source: str) -> Any:
    """``value`` of field ``key`` checked against its rule (None passes: the type allowed it)."""
    if value is None:
        return None
    what = f"{source}: {key}"
    if r.choices is not None:
        options = tuple(r.choices() if callable(r.choices) else r.choices)
        if value not in options:
            raise ConfigError(f"{what}: {value!r} is not one of {', '.join(map(str, options))}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if (
            (r.finite and not math.isfinite(value))
            or (r.minimum is not None and not value >= r.minimum)
            or (r.above is not None and not value > r.above)
        ):
            raise ConfigError(f"{what}: must be {_range_text(r)}, got {value}")
    if r.check is not None:
        value = r.check(value, what)
    return value


def check_fields(obj: Any, source: str = "config") -> None:
    """Every field of dataclass instance ``obj`` checked against its type and its :func:`rule`."""
    for f in dataclasses.fields(obj):
        value = coerce_value(type(obj), f.name, getattr(obj, f.name), source)
        if _RULE in f.metadata:
            check_value(f.name, value, f.metadata[_RULE], source)


def build(cls: type[T], data: Any, source: str, from_text: bool = False) -> T:
    """The dataclass ``cls`` from mapping ``data``: unknown keys refused, values coerced, defaults
    filled in by the dataclass, every rule checked. ConfigError (one line naming ``source``) otherwise."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    values = {str(k): coerce_value(cls, str(k), v, source, from_text) for k, v in data.items()}
    try:
        obj = cls(**values)
    except TypeError as exc:  # a required key missing
        missing = [f.name for f in dataclasses.fields(typing.cast(Any, cls)) if f.name not in values and _required(f)]
        raise ConfigError(f"{source}: missing key(s) {', '.join(missing) or '?'} ({exc})") from exc
    check_fields(obj, source)
    return obj


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def read_mapping(path: str | os.PathLike[str], what: str = "config file") -> dict[str, Any]:
    """A YAML (or JSON) file's top-level mapping; ConfigError naming the file on any problem; empty file: {}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data
