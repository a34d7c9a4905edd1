"""Exceptions that the CLI turns into a one-line message instead of a traceback."""

from __future__ import annotations


class SpotdiffError(Exception):
    """Base class for expected, user-facing errors (bad input, bad files, bad config)."""


class DataError(SpotdiffError, ValueError):
    """A dataset file, CSV row, image or mask is missing, unreadable or inconsistent.

    The message always names the offending file or CSV row.
    """


class WeightsError(SpotdiffError, ValueError):
    """A weights/checkpoint/model file is missing, unsafe, tampered or does not fit the model."""


class ConfigError(SpotdiffError, ValueError):
    """An option or config file value is invalid."""


class OutputError(SpotdiffError, OSError):
    """An output file or folder could not be written (disk full, read-only, no permission).

    Also an ``OSError``, so ``except OSError`` handlers keep working; ``errno`` and ``strerror``
    are the cause's. The message names the file.
    """

    def __init__(self, message: str, errno: int | None = None, strerror: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.strerror = strerror or message

    def __str__(self) -> str:
        return str(self.args[0])
