"""Atomic file writing: write to a temporary file in the target directory, fsync, rename.

An interrupted process never leaves a half-written file at the destination path; at worst a
``.<name>.tmp-*`` file is left beside it: readers ignore hidden files, and a writer that
reruns removes them first (`remove_stale_temp_files`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from spotdiff.errors import OutputError

TMP_PREFIX = "."
TMP_MARK = ".tmp-"


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open()``/``mkdir()`` would give a new file (0o666) or folder (0o777) under the umask.

    ``tempfile.mkstemp``/``mkdtemp`` create owner-only (0o600/0o700) entries; every atomic writer
    applies this mode before the rename so outputs get the usual permissions.
    """
    return (0o777 if directory else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is fsynced and renamed onto ``dest``.

    On any exception the temporary file is removed and ``dest`` is left untouched; an
    ``OSError`` (disk full, read-only, no permission, ...) becomes an `OutputError` naming ``dest``.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{dest.name}{TMP_MARK}", dir=dest.parent)
    except OSError as exc:
        raise output_error(dest, exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, default_mode())
        os.replace(tmp_path, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise output_error(dest, exc) from exc
        raise


def output_error(dest: str | os.PathLike[str], exc: BaseException) -> OutputError:
    """An `OutputError` for a failed write of ``dest`` caused by ``exc``."""
    reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
    return OutputError(f"{dest}: cannot write ({reason})", getattr(exc, "errno", None), reason)


def torch_save_atomic(dest: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save(obj)`` to ``dest`` atomically; a failed write is an `OutputError` naming ``dest``.

    torch reports write failures (disk full, ...) as a ``RuntimeError`` from its zip writer.
    """
    import torch

    with atomic_path(dest) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            raise output_error(dest, RuntimeError(f"disk full, file size limit or I/O error; torch: {exc}")) from exc


def save_safetensors_atomic(
    dest: str | os.PathLike[str], tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` to ``dest`` atomically; I/O failures become `OutputError`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(dest) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:
            if "I/O error" not in str(exc):
                raise
            raise output_error(dest, exc) from exc
        if metadata and len(metadata) > 1:
            _sort_safetensors_metadata(tmp)


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the ``__metadata__`` of a safetensors file in sorted key order, in place.

    safetensors writes metadata from a hash map, so its key order (and the file's bytes) change
    from one save to the next; sorted, the same tensors and metadata give the same bytes. The
    header keeps its length (same keys and values, compact JSON, space padding as the format allows).
    """
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # never happens with serde's compact JSON; keep the file as written
            return
        fh.seek(8)
        fh.write(text.ljust(size, b" "))


def is_temp_file_of(name: str, dest_names: Collection[str]) -> bool:
    """True when ``name`` is a leftover temporary file of `atomic_path` for one of ``dest_names``."""
    if not name.startswith(TMP_PREFIX) or TMP_MARK not in name:
        return False
    return name[len(TMP_PREFIX) : name.rindex(TMP_MARK)] in dest_names


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
            stale = [
                Path(e.path) for e in entries if is_temp_file_of(e.name, names) and e.is_file(follow_symlinks=False)
            ]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path)
    return removed


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def create_text_exclusive(dest: str | os.PathLike[str], text: str) -> bool:
    """Create ``dest`` holding UTF-8 ``text`` only if it does not exist yet; True when this call created it.

    The text goes to a temporary file beside ``dest`` that is then hard-linked to ``dest``: ``link``
    fails atomically when ``dest`` exists (also on NFS), and no reader ever sees ``dest`` empty or
    partial. Where hard links are not supported, ``open(O_CREAT | O_EXCL)`` and a write are used.
    An ``OSError`` of the machine becomes an `OutputError` naming ``dest``.
    """
    dest = Path(dest)
    data = text.encode("utf-8")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{dest.name}{TMP_MARK}", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, default_mode())
            try:
                os.link(tmp, dest)
                return True
            except FileExistsError:
                return False
            except OSError as exc:  # no hard links on this filesystem
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, default_mode())
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True
    except OSError as exc:
        raise output_error(dest, exc) from exc
