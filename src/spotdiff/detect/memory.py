"""Memory estimates checked before a detector allocates its large tensors."""

from __future__ import annotations

import os

from spotdiff.errors import ConfigError


def available_bytes() -> int:
    """Memory this process can still allocate: ``MemAvailable`` of /proc/meminfo (Linux), else physical RAM."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62


def format_bytes(n: float) -> str:
    """``1.5 GB``-style size (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def check_memory_fits(need: int, what: str, remedy: str) -> None:
    """Raise :class:`ConfigError` in one line when ``need`` bytes exceed :func:`available_bytes`."""
    free = available_bytes()
    if need > free:
        raise ConfigError(
            f"{what} need about {format_bytes(need)} but only {format_bytes(free)} of memory is "
            f"available; reduce it with {remedy}"
        )
