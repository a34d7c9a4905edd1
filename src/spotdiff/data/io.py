"""Image and mask reading with clear errors that name the file.

Every image is returned as 8-bit RGB whatever its mode on disk (grayscale, RGBA, palette,
CMYK, 16-bit, float); EXIF orientation is applied. Integer images are scaled by their bit depth
(a 16-bit image by 65535, whatever its content), float images by their documented range [0, 1]
(values outside it are refused). Masks are returned as integer arrays of class ids.
A broken symbolic link, an unreadable file and a decompression bomb all raise a `DataError`
naming the file. Bytes (an upload) are read by `load_image_bytes`, on the same steps as a file.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from spotdiff.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

# Refuse decompression bombs: PIL raises DecompressionBombError above 2x this many pixels and
# only warns between 1x and 2x; we turn the warning into an error too (see `open_image`).
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# PIL's warning between 1x and 2x the limit would print a second line beside our one-line refusal.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
FLOAT_RANGE = (0.0, 1.0)
"""The documented value range of float (mode ``F``) images: 0 is black, 1 is white."""


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` has an image file extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _missing(path: Path) -> DataError:
    if path.is_symlink():
        return DataError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)")
    return DataError(f"{path}: file not found")


class ImageTooLarge(DataError):
    """An image declares more pixels than allowed (a possible decompression bomb)."""


def _bomb_check(name: str | os.PathLike[str], img: Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageTooLarge(
            f"{name}: image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels (possible decompression bomb)"
        )


def _open_source(source: Path | BinaryIO, name: str | os.PathLike[str], max_pixels: int) -> Image.Image:
    """``Image.open`` (header only) of a file or a byte stream, with every failure, bombs included
    (more than ``max_pixels`` pixels), as a DataError naming ``name``."""
    try:
        img = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{name}: refused as a possible decompression bomb ({exc})") from exc
    except Image.UnidentifiedImageError:
        raise DataError(f"{name}: cannot read image (not an image: in no format PIL reads)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: cannot read image ({exc})") from exc
    _bomb_check(name, img, max_pixels)
    return img


def _open(path: Path) -> Image.Image:
    """``Image.open`` (header only) with every failure, bombs included, as a DataError naming ``path``."""
    if not path.is_file():
        raise _missing(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    return _open_source(path, path, MAX_IMAGE_PIXELS)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (no decoding); DataError like `load_image`."""
    path = Path(path)
    with _open(path) as img:
        return img.size


def _load(img: Image.Image, name: str | os.PathLike[str]) -> Image.Image:
    """Decode the pixels of an opened image; every failure as a DataError naming ``name``."""
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{name}: refused as a possible decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: cannot read image ({exc})") from exc
    return img


def _open_checked(path: Path) -> Image.Image:
    return _load(_open(path), path)


def bit_depth(img: Image.Image) -> int:
    """Bits per sample of an integer grayscale image: 16 for ``I;16*``; for mode ``I`` the file's
    own (TIFF BitsPerSample; 16 for PNG, which Pillow < 10 opened as ``I``), else 32; 8 otherwise."""
    if img.mode.startswith("I;16"):
        return 16
    if img.mode == "I":
        tags = getattr(img, "tag_v2", None)
        bits = tags.get(258) if tags is not None else None
        if isinstance(bits, tuple):
            bits = bits[0] if bits else None
        if isinstance(bits, int) and 8 < bits <= 32:
            return bits
        return 16 if img.format == "PNG" else 32
    return 8


def to_rgb(img: Image.Image, path: str | os.PathLike[str] = "image", bits: int | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is dropped (composited on black).

    Integer grayscale deeper than 8 bits is scaled by its bit depth (see `bit_depth`), never by its
    content; float images (mode ``F``) are scaled from [0, 1] and refused (DataError naming ``path``)
    when a value is outside that range or not finite. ``bits``: the bit depth when known (read before
    a transpose drops the file's tags), else `bit_depth`.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):
        top = float(2 ** (bits or bit_depth(img)) - 1)
        arr = np.asarray(img, dtype=np.float64)
        arr8 = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        low, high = FLOAT_RANGE
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: float image holds NaN or infinite values")
        if arr.size and (arr.min() < low or arr.max() > high):
            raise DataError(
                f"{path}: float image values must be in [{low:g}, {high:g}] (0 black, 1 white), "
                f"found [{arr.min():.6g}, {arr.max():.6g}]; save it as 8- or 16-bit integers instead"
            )
        arr8 = np.clip(np.round((arr - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def _oriented_rgb(img: Image.Image, name: str | os.PathLike[str]) -> Image.Image:
    """A decoded image with its EXIF orientation applied, as 8-bit RGB (`to_rgb` at its bit depth)."""
    bits = bit_depth(img)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # a broken EXIF block must not kill the whole run
        raise DataError(f"{name}: cannot apply EXIF orientation ({exc})") from exc
    return to_rgb(img, name, bits)


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image, EXIF orientation applied.

    Raises:
        DataError: the file is missing (or a broken symbolic link), empty, truncated, corrupt, too
            large (:class:`ImageTooLarge`), or a float image outside [0, 1]; the message names the file.
    """
    path = Path(path)
    return _oriented_rgb(_open_checked(path), path)


def load_image_bytes(data: bytes, name: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The bytes of an image file (e.g. an upload) as :func:`load_image` reads the file: the same
    steps (header, pixel limit, decoding, EXIF orientation, `to_rgb` at the file's bit depth) and
    the same errors, naming ``name``.

    ``max_pixels`` (width x height, checked from the header before decoding) may be lowered below
    ``MAX_IMAGE_PIXELS``; above twice it PIL refuses the image anyway.

    Raises:
        ImageTooLarge: more than ``max_pixels`` pixels (a DataError).
        DataError: empty, not an image, truncated or corrupt, or a float image outside [0, 1].
    """
    if not data:
        raise DataError(f"{name}: empty (0 bytes)")
    return _oriented_rgb(_load(_open_source(io.BytesIO(data), name, max_pixels), name), name)


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


def image_to_array(img: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB PIL image -> ``(3, H, W)`` float32 in [0, 1], resized to ``size`` ``(H, W)`` (None: kept)
    by Pillow's antialiased bilinear filter on the 8-bit image, then scaled by 1/255 (whole grey levels).

    The one image-to-model-input conversion of spotdiff (:func:`spotdiff.data.transforms.image_to_tensor`
    wraps it), torch-free so that ``predict --backend onnxruntime`` decodes exactly as ``fit`` did.
    Our choice over torchvision's uint8 resize (which follows Pillow's algorithm but rounds
    differently, up to one grey level): one implementation for both back ends.
    """
    if size is not None and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.uint8)
    if pixels.ndim == 2:  # a single-band image
        pixels = pixels[..., None]
    out = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
    out *= np.float32(1.0 / 255.0)  # as torchvision.transforms.v2.functional.to_dtype(scale=True)
    return out
