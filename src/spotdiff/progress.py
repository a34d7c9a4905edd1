"""One progress-bar helper for every long loop, silenced globally by ``--quiet``, and the one
logging handler the CLI installs on the ``spotdiff`` logger (one line per message on stderr)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_QUIET = os.environ.get("SPOTDIFF_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar (and `log` line) off or on for this process."""
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, **kwargs: Any) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr unless quiet; extra kwargs go to tqdm."""
    return iter(
        tqdm(
            iterable, desc=desc, total=total, disable=_QUIET, dynamic_ncols=True, leave=False, file=sys.stderr, **kwargs
        )
    )


def bar(total: int | None = None, desc: str = "", **kwargs: Any) -> tqdm:
    """A manually updated tqdm bar (``.update(n)``, ``.set_postfix(...)``), off when quiet."""
    return tqdm(total=total, desc=desc, disable=_QUIET, dynamic_ncols=True, leave=False, file=sys.stderr, **kwargs)


class StderrLineHandler(logging.Handler):
    """Writes each record's message as one line to the ``sys.stderr`` of the moment (so pytest's
    capture and redirections see it); below ``WARNING`` nothing is written while quiet."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and _QUIET:
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # logging's contract: a failed emit never raises
            self.handleError(record)


def install_stderr_handler() -> logging.Logger:
    """Give the ``spotdiff`` logger its one stderr handler (idempotent) at level ``INFO``.

    Called by the CLI; a library user who does not call it gets Python's default (warnings on stderr
    through ``logging.lastResort``, info lines nowhere) and may configure logging as usual."""
    logger = logging.getLogger("spotdiff")
    if not any(isinstance(h, StderrLineHandler) for h in logger.handlers):
        logger.addHandler(StderrLineHandler())
    logger.setLevel(logging.INFO)
    return logger
