"""One progress-bar helper for every long loop, silenced globally by ``--quiet``."""

from __future__ import annotations

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


def log(message: str) -> None:
    """Print a status line to stderr unless quiet."""
    if not _QUIET:
        print(message, file=sys.stderr, flush=True)
