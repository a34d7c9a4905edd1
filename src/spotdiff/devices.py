"""The torch device of a command: ``--device auto`` (the default everywhere) is CUDA when available, else CPU."""

from __future__ import annotations

import torch

from spotdiff.errors import ConfigError

AUTO = "auto"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other names are passed to torch.

    Raises:
        ConfigError: a name torch does not know, or a CUDA device on a machine without CUDA.
    """
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"bad device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device
