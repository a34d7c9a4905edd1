"""Atomic file writing: write to a temporary file in the target directory, fsync, rename.

An interrupted process never leaves a half-written file at the destination path; at worst a
``.<name>.tmp-*`` file is left beside it: readers ignore hidden files, and a writer that
reruns removes them first (`remove_stale_temp_files`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = "."
TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is fsynced and renamed onto ``dest``.

    On any exception the temporary file is removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{dest.name}{TMP_MARK}", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def is_temp_file_of(name: str, dest_names: Collection[str]) -> bool:
    """True when ``name`` is a leftover temporary file of `atomic_path` for one of ``dest_names``."""
    if not name.startswith(TMP_PREFIX) or TMP_MARK not in name:
        return False
    return name[len(TMP_PREFIX):name.rindex(TMP_MARK)] in dest_names


def remove_stale_temp_files(dests: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Delete the ``.<name>.tmp-*`` files that an interrupted writer left beside any of ``dests``.

    Lists each folder once. Call it before rewriting ``dests``, never while another process
    writes them. Returns the removed paths.
    """
    by_folder: dict[Path, set[str]] = {}
    for dest in dests:
        dest = Path(dest)
        by_folder.setdefault(dest.parent, set()).add(dest.name)
    removed = []
    for folder, names in by_folder.items():
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            stale = [Path(e.path) for e in entries if is_temp_file_of(e.name, names) and e.is_file(follow_symlinks=False)]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path)
    return removed


def write_bytes_atomic(dest: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``dest`` atomically."""
    write_bytes_atomic(dest, text.encode("utf-8"))


def write_json_atomic(dest: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``dest`` atomically."""
    write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")
