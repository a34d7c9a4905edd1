"""Ordered parallel decoding: items of a dataset (or any function over a list) computed by threads.

Pillow's JPEG/PNG decoders and its resize release the GIL, so threads decode and resize images
on several cores while the main thread runs the model, without copying the dataset into worker
processes. Results come back in input order and equal the serial ones (each item is computed by
the same function, independently).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_DECODE_WORKERS = 4


def decode_workers(requested: int | None = None) -> int:
    """Decoding threads: ``requested`` if given, else the cores this process may use minus one (the
    model's), between 0 and ``MAX_DECODE_WORKERS``. 0 decodes in the calling thread."""
    if requested is not None:
        if requested < 0:
            from spotdiff.errors import ConfigError

            raise ConfigError(f"workers must be >= 0, got {requested}")
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(0, min(MAX_DECODE_WORKERS, cores - 1))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int = 8) -> Iterator[R]:
    """``map(fn, items)`` computed by ``workers`` threads, at most ``workers + ahead`` items in flight.

    An exception raised by ``fn`` is raised here when its item's turn comes; items after it are
    cancelled. ``workers == 0`` is the plain serial ``map``.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spotdiff-decode") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers + ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter), consumed lazily."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class ItemDataset(Protocol):
    """A map-style dataset with a length: ``len(d)`` and ``d[i]`` for ``i`` in ``range(len(d))``.

    Every spotdiff dataset is one, and so is any torch ``Dataset`` with ``__len__`` (``Subset`` too).
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


def batches(dataset: ItemDataset, batch_size: int, workers: int) -> Iterator[Any]:
    """``dataset[0], dataset[1], ...`` in order, collated by ``torch.utils.data.default_collate`` into
    batches of ``batch_size`` (the last may be smaller), items decoded by ``workers`` threads."""
    from torch.utils.data import default_collate  # here, so that the rest of this module needs no torch

    items = ordered_map(dataset.__getitem__, range(len(dataset)), workers, ahead=2 * batch_size)
    return (default_collate(batch) for batch in chunked(items, batch_size))
