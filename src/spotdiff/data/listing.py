"""Listing image files in folders (torch-free: ``predict --backend onnxruntime`` uses it without torch)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from spotdiff.data.io import is_image_file
from spotdiff.errors import DataError

PathLike = str | os.PathLike[str]


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    """Image files under ``folder`` (sorted, hidden names skipped), reached through symbolic links too.

    A symbolic link to a folder is followed; one that leads back to a folder it sits in is a loop
    (DataError naming the link). A broken link with an image extension is kept, so that reading it
    reports it like any unreadable file.
    """
    found: list[Path] = []

    def walk(directory: Path, ancestors: tuple[tuple[int, int], ...]) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise DataError(f"{directory}: cannot list folder ({exc.strerror or exc})") from exc
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                if not recursive:
                    continue
                st = path.stat()
                identity = (st.st_dev, st.st_ino)
                if identity in ancestors:
                    raise DataError(
                        f"{path}: symbolic link loop (it leads back to {path.resolve()}, a folder that contains it)"
                    )
                walk(path, (*ancestors, identity))
            elif is_image_file(path) and (entry.is_file() or entry.is_symlink()):
                found.append(path)

    st = folder.stat()
    walk(folder, ((st.st_dev, st.st_ino),))
    return sorted(found)


def list_images(
    paths_or_dir: PathLike | Sequence[PathLike], recursive: bool = False, allow_empty: bool = False
) -> list[Path]:
    """Image files named by ``paths_or_dir``: a folder, a file, or a list of either.

    Folders contribute their image files (by extension, hidden files ignored), sorted by path;
    with ``recursive`` their subfolders too, following symbolic links (a link loop is refused).
    Explicit files keep the given order and must be images. A broken symbolic link with an image
    extension is listed: reading it raises the DataError of an unreadable file.

    Raises:
        DataError: a path is missing or not an image, a link loop, one file reached twice (the same
            folder given twice, or linked twice), or no image found (unless ``allow_empty``: a
            caller that only minds when nothing at all is found should pass it rather than catch
            every DataError, which would hide a loop).
    """
    items = [paths_or_dir] if isinstance(paths_or_dir, (str, os.PathLike)) else list(paths_or_dir)
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend(_image_files(path, recursive))
        elif path.is_file():
            if not is_image_file(path):
                raise DataError(f"{path}: not an image file (expected one of .jpg .jpeg .png .bmp .tif .tiff .webp)")
            found.append(path)
        elif path.is_symlink():
            raise DataError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)")
        else:
            raise DataError(f"{path}: no such file or folder")
    if not found and not allow_empty:
        names = ", ".join(str(i) for i in items) or "(no paths given)"
        raise DataError(f"no image files found in {names}")
    check_unique(found)
    return found


def check_unique(paths: Sequence[Path]) -> None:
    """DataError naming the first file reached twice (same real path) in ``paths``."""
    seen: dict[str, Path] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise DataError(
                f"{path}: the same file as {seen[real]} (a folder given twice, or linked twice); "
                "each image may be listed once"
            )
        seen[real] = path
