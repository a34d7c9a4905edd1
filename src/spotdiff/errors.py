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
