"""Shared helpers for the reliability suite: the CLI as a subprocess, tiny VisA trees, image kinds.

Every subprocess runs the spotdiff package that the tests import (its ``src`` folder goes first on
``PYTHONPATH``), with one thread, so results do not depend on an installed copy.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import spotdiff

SPOTDIFF_SRC = Path(spotdiff.__file__).resolve().parents[1]
CSV_HEADER = ("object", "split", "label", "image", "mask")
OBJECT = "obj"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a spotdiff subprocess: this checkout first on the path, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SPOTDIFF_SRC), env.get("PYTHONPATH", "")) if p)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def cli_command(*args: str | os.PathLike[str]) -> list[str]:
    """``python -m spotdiff --quiet ARGS...``."""
    return [sys.executable, "-m", "spotdiff", "--quiet", *map(str, args)]


def run_cli(
    *args: str | os.PathLike[str],
    timeout: float = 300,
    prefix: Sequence[str] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter; ``prefix`` wraps it (e.g. ``unshare ...``)."""
    return subprocess.run(
        [*prefix, *cli_command(*args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        preexec_fn=preexec_fn,
    )


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with this checkout's spotdiff."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=cli_env())


def assert_clean_error(proc: subprocess.CompletedProcess[str], *names: str | os.PathLike[str]) -> None:
    """Exit status 2 (a SpotdiffError), no traceback, and stderr names every one of ``names``."""
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr, detail
    for name in names:
        assert str(name) in proc.stderr, f"{name} not named\n{detail}"


# ---------------------------------------------------------------------------------------- images
# A 32x24 (width x height) picture: a white block on black; masks mark the same block.
W, H = 32, 24
BLOCK = (slice(4, 12), slice(6, 18))  # rows, cols


def block_array(h: int = H, w: int = W) -> np.ndarray:
    """``(h, w)`` uint8: 255 in `BLOCK`, 0 elsewhere."""
    arr = np.zeros((h, w), np.uint8)
    arr[BLOCK] = 255
    return arr


def block_mask(h: int = H, w: int = W) -> np.ndarray:
    """``(h, w)`` uint8 class ids: 1 in `BLOCK`."""
    return (block_array(h, w) > 0).astype(np.uint8)


def _rgb() -> Image.Image:
    return Image.fromarray(np.stack([block_array()] * 3, axis=-1))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    # Stored turned 90 degrees counter-clockwise with EXIF orientation 6 ("rotate 90 CW to view"),
    # so only a reader that applies EXIF sees the W x H picture with the block in place.
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_rgb().transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)


# Images that every command must read as the W x H block picture: (file suffix, bytes).
GOOD_IMAGES: dict[str, tuple[str, Callable[[], bytes]]] = {
    "png_named_jpg": (".JPG", lambda: _save(_rgb(), "PNG")),
    "cmyk_jpeg": (".JPG", lambda: _save(_rgb().convert("CMYK"), "JPEG", quality=95)),
    "gray_jpeg": (".JPG", lambda: _save(Image.fromarray(block_array()), "JPEG", quality=95)),
    "png_16bit": (".png", lambda: _save(Image.fromarray(block_array().astype(np.uint16) * 257), "PNG")),
    "rgba_png": (".png", lambda: _save(_rgb().convert("RGBA"), "PNG")),
    "palette_png": (".png", lambda: _save(_rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=2), "PNG")),
    "exif_rotated": (".JPG", _exif_rotated),
}


def _truncated() -> bytes:
    data = _save(_rgb(), "JPEG", quality=95)
    return data[: len(data) // 2]


# Images no command may accept: (file suffix, bytes).
BAD_IMAGES: dict[str, tuple[str, Callable[[], bytes]]] = {
    "zero_bytes": (".JPG", lambda: b""),
    "truncated_jpeg": (".JPG", _truncated),
    "text_named_jpg": (".JPG", lambda: b"this is a text file, not a JPEG\n"),
}


def png_bytes(arr: np.ndarray) -> bytes:
    return _save(Image.fromarray(arr), "PNG")


# ------------------------------------------------------------------------------------ VisA trees
@dataclass(frozen=True)
class Row:
    """One split-CSV row and the bytes of its files (``mask`` None for a normal image)."""

    split: str
    label: str
    image: str
    image_bytes: bytes
    mask: str = ""
    mask_bytes: bytes | None = None
    object: str = OBJECT


def normal_row(name: str, data: bytes, split: str = "train", suffix: str = ".JPG", obj: str = OBJECT) -> Row:
    return Row(split, "normal", f"{obj}/Data/Images/Normal/{name}{suffix}", data, object=obj)


def anomaly_row(name: str, data: bytes, mask: bytes | None = None, suffix: str = ".JPG", obj: str = OBJECT) -> Row:
    mask = png_bytes(block_mask()) if mask is None else mask
    return Row(
        "test",
        "anomaly",
        f"{obj}/Data/Images/Anomaly/{name}{suffix}",
        data,
        f"{obj}/Data/Masks/Anomaly/{name}.png",
        mask,
        obj,
    )


def write_tree(root: Path, rows: Sequence[Row], split: str = "1cls") -> Path:
    """A raw VisA root holding ``rows`` and ``split_csv/<split>.csv``; returns ``root``."""
    for r in rows:
        for rel, data in ((r.image, r.image_bytes), (r.mask, r.mask_bytes)):
            if rel:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(data)
    write_csv(root / "split_csv" / f"{split}.csv", [(r.object, r.split, r.label, r.image, r.mask) for r in rows])
    return root


def write_csv(path: Path, rows: Sequence[Sequence[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)
    return path


def noise_jpeg(seed: int, size: int = 32) -> bytes:
    """A small random JPEG, different per seed."""
    rng = np.random.default_rng(seed)
    return _save(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "JPEG", quality=90)


def object_rows(
    obj: str = OBJECT, n_train: int = 4, n_good: int = 2, n_bad: int = 2, size: int = 32, seed: int = 0
) -> list[Row]:
    """Rows of one object: random ``size`` x ``size`` JPEGs; anomalies have a square mask."""
    rows = [normal_row(f"{i:05d}", noise_jpeg(seed + i, size), obj=obj) for i in range(n_train)]
    rows += [
        normal_row(f"{n_train + i:05d}", noise_jpeg(seed + n_train + i, size), split="test", obj=obj)
        for i in range(n_good)
    ]
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : size // 2, size // 4 : size // 2] = 1
    rows += [
        anomaly_row(f"{i:05d}", noise_jpeg(seed + 10_000 + i, size), png_bytes(mask), obj=obj) for i in range(n_bad)
    ]
    return rows


def simple_tree(root: Path, n_train: int = 4, n_good: int = 2, n_bad: int = 2, size: int = 32, seed: int = 0) -> Path:
    """A valid raw VisA tree of one object (`OBJECT`), see `object_rows`."""
    return write_tree(root, object_rows(OBJECT, n_train, n_good, n_bad, size, seed))


def tree_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative POSIX path -> bytes), temp files included."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def is_temp_name(rel: str) -> bool:
    """An `atomic_path` temporary file (``.<name>.tmp-*``)."""
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") and ".tmp-" in name


# ------------------------------------------------------------------------------ hostile payloads
class Payload:
    """Unpickling this calls ``os.makedirs(marker)``: the folder's existence proves code ran.

    The pickle stream names ``os.makedirs`` itself, so it runs in any interpreter that unpickles it.
    """

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def payload_pickle(marker: Path) -> bytes:
    """Raw pickle bytes that create ``marker`` when unpickled."""
    import pickle

    return pickle.dumps(Payload(marker))


def run_cli_many(
    argvs: Sequence[Sequence[str | os.PathLike[str]]],
    timeout: float = 300,
    prefix: Sequence[str] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> tuple[list[int], str]:
    """Run several CLI commands in ONE fresh interpreter (one torch import); ``(exit codes, stderr)``.

    Each command goes through ``spotdiff.cli.main`` exactly as ``python -m spotdiff`` does; an
    uncaught exception ends the interpreter with its traceback on stderr.
    """
    argv_lists = [["--quiet", *map(str, a)] for a in argvs]
    code = (
        "import sys\nfrom spotdiff.cli import main\n"
        f"for argv in {argv_lists!r}:\n    print('EXIT', main(argv), flush=True)\n"
    )
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        preexec_fn=preexec_fn,
    )
    codes = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("EXIT ")]
    assert "Traceback" not in proc.stderr and len(codes) == len(argv_lists), (
        f"exit {proc.returncode}, codes {codes}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return codes, proc.stderr
