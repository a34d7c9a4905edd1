"""Image and mask reading with clear errors that name the file.

Every image is returned as 8-bit RGB whatever its mode on disk (grayscale, RGBA, palette,
CMYK, 16-bit); EXIF orientation is applied. Masks are returned as integer arrays of class ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from spotdiff.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

# Refuse decompression bombs: PIL raises DecompressionBombError above 2x this many pixels and
# only warns between 1x and 2x; we turn the warning into an error too (see `open_image`).
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` has an image file extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _open_checked(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        img = Image.open(path)
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise DataError(
                f"{path}: image of {w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS} "
                "pixels (possible decompression bomb)"
            )
        img.load()
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused as a possible decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16-bit grayscale is scaled down, alpha is dropped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr8 = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image, EXIF orientation applied.

    Raises:
        DataError: the file is missing, empty, truncated, corrupt, or too large; the message
            names the file.
    """
    path = Path(path)
    img = _open_checked(path)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # a broken EXIF block must not kill the whole run
        raise DataError(f"{path}: cannot apply EXIF orientation ({exc})") from exc
    return to_rgb(img)


def load_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a mask file as a 2-D ``uint8`` array of class ids (0 = background).

    Palette masks keep their indices; RGB masks are reduced to their first channel.
    """
    path = Path(path)
    img = _open_checked(path)
    if img.mode in ("P", "L"):
        arr = np.asarray(img)
    elif img.mode in ("1",):
        arr = np.asarray(img, dtype=np.uint8)
    elif img.mode.startswith("I"):
        arr = np.asarray(img)
        if arr.max(initial=0) > 255:
            raise DataError(f"{path}: mask values exceed 255")
    else:
        arr = np.asarray(img.convert("RGB"))[..., 0]
    return np.array(arr, dtype=np.uint8, copy=True)  # writable, contiguous
