"""The one device rule of every command: ``auto`` (the default everywhere) is CUDA when available, else CPU;
``cpu``, ``cuda`` and ``cuda:N`` name a device. :func:`check_device_name` checks a name when a config is
read (no GPU needed); :func:`resolve_device` turns it into a ``torch.device`` when the command runs."""

from __future__ import annotations

import re

import torch

from spotdiff.errors import ConfigError

AUTO = "auto"
DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: object, what: str = "device") -> str:
    """``name`` when it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ConfigError naming ``what`` otherwise.

    ``what`` says where the name came from (``--device``, ``config.yaml: device``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{what} {name!r}: choose {DEVICE_NAMES}")
    return name


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other names are passed to torch.

    Raises:
        ConfigError: a name torch does not know, a CUDA device on a machine without CUDA, or
            ``cuda:N`` beyond this machine's devices.
    """
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"bad device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(
            f"device {name!r} requested but this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
        )
    return device
