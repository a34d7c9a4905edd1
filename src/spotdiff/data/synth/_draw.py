"""Vectorised drawing primitives shared by the synthetic objects.

Images are float32 arrays of shape (H, W, 3) with values in [0, 1]; masks/alphas are float32
(H, W) in [0, 1]. Pixel (row y, column x) has its centre at coordinates (x, y); shapes are
described by signed distance fields (negative inside, in pixels) whose coverage
``clip(0.5 - sdf, 0, 1)`` gives one pixel of anti-aliasing, or drawn with PIL ``ImageDraw``
(supersampled). ``Camera`` turns the finished scene into 8-bit pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

Point = tuple[float, float]
Color = tuple[float, float, float]


@lru_cache(maxsize=4)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) coordinate arrays of shape (size, size), float32, read-only."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@lru_cache(maxsize=8)
def _base_texture(name: str, size: int) -> np.ndarray:
    """One scikit-image texture (brick, grass, gravel), zero mean, unit std, at least size x size."""
    from skimage import data as skdata  # imported lazily: only needed when generating

    raw = np.asarray(getattr(skdata, name)(), dtype=np.float32)
    if raw.ndim == 3:
        raw = raw.mean(axis=2)
    if min(raw.shape) < size:
        side = int(np.ceil(size / min(raw.shape) * max(raw.shape)))
        raw = np.asarray(Image.fromarray(raw, mode="F").resize((side, side), Image.Resampling.BICUBIC))
    out = (raw - raw.mean()) / (raw.std() + 1e-6)
    out.setflags(write=False)
    return out


def texture(name: str, rng: np.random.Generator, size: int, zoom: float = 1.0) -> np.ndarray:
    """A random size x size crop of a scikit-image texture, randomly flipped/rotated by 90 degrees.

    ``zoom`` > 1 magnifies the texture (coarser grain). Zero mean, roughly unit std, float32.
    """
    src_side = max(8, int(round(size / zoom)))
    base = _base_texture(name, src_side)
    h, w = base.shape
    y0 = int(rng.integers(0, h - src_side + 1))
    x0 = int(rng.integers(0, w - src_side + 1))
    crop = base[y0 : y0 + src_side, x0 : x0 + src_side]
    crop = np.rot90(crop, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if src_side != size:
        crop = np.asarray(
            Image.fromarray(np.ascontiguousarray(crop), mode="F").resize((size, size), Image.Resampling.BILINEAR)
        )
    return np.ascontiguousarray(crop, dtype=np.float32)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field (bicubic upsampling of a cells x cells Gaussian grid), unit std, float32."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC))
    return (field / (field.std() + 1e-6)).astype(np.float32)


def coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased area coverage of the shape ``sdf < 0`` (one-pixel ramp), float32 in [0, 1]."""
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def pil_mask(size: int, draw_fn, supersample: int = 1) -> np.ndarray:
    """Run ``draw_fn(ImageDraw, scale)`` on a black "L" canvas; return float32 coverage in [0, 1].

    With ``supersample`` > 1 the shapes are drawn at that many times the resolution (coordinates
    multiplied by ``scale``) and box-filtered down, which anti-aliases their edges.
    """
    side = size * supersample
    canvas = Image.new("L", (side, side), 0)
    draw_fn(ImageDraw.Draw(canvas), float(supersample))
    if supersample > 1:
        canvas = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def scaled(points: Sequence[Point], scale: float) -> list[Point]:
    """Pixel-centre coordinates to PIL coordinates on a canvas ``scale`` times larger."""
    return [((px + 0.5) * scale - 0.5, (py + 0.5) * scale - 0.5) for px, py in points]


def bbox(alpha: np.ndarray) -> tuple[slice, slice] | None:
    """Row and column slices of the smallest box holding every non-zero pixel; None if all zero."""
    rows = np.flatnonzero(alpha.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(alpha.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def paint(
    image: np.ndarray, alpha: np.ndarray, color: Color | np.ndarray, light: np.ndarray | None = None
) -> np.ndarray:
    """Alpha-blend ``color`` (an RGB triple or an (H, W, 3) image), optionally multiplied by a
    per-pixel intensity ``light`` (H, W), over ``image``. Returns a new array; only the bounding
    box of ``alpha`` is computed."""
    out = image.copy()
    box = bbox(alpha)
    if box is None:
        return out
    a = alpha[box][..., None]
    col = np.asarray(color, dtype=np.float32)
    if col.ndim == 3:
        col = col[box]
    if light is not None:
        col = col * light[box][..., None]
    region = out[box]
    out[box] = region + a * (col - region)
    return out


def shade(color: Color, light: np.ndarray) -> np.ndarray:
    """An (H, W, 3) image of ``color`` multiplied by a per-pixel intensity ``light``."""
    return light[..., None] * np.asarray(color, dtype=np.float32)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the spatial axes (an (H, W) or (H, W, C) array), sigma in pixels."""
    if sigma <= 0:
        return image
    sig = (sigma, sigma) + (0,) * (image.ndim - 2)
    return ndimage.gaussian_filter(image, sig, mode="nearest", truncate=3.0)


def rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """Rotate (N, 2) points about the origin by ``angle`` radians (y axis pointing down)."""
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def random_walk(
    rng: np.random.Generator, start: Point, heading: float, steps: int, step: float, wiggle: float
) -> list[Point]:
    """A jagged polyline (crack, scratch): ``steps`` segments of length ``step`` pixels, the heading
    changing by a Gaussian of std ``wiggle`` radians at each vertex."""
    turns = np.cumsum(rng.normal(0.0, wiggle, steps)) + heading
    pts = np.cumsum(np.stack([np.cos(turns), np.sin(turns)], axis=1) * step, axis=0) + np.asarray(start)
    return [(float(start[0]), float(start[1]))] + [(float(x), float(y)) for x, y in pts]


@lru_cache(maxsize=2)
def _noise_bank(side: int) -> np.ndarray:
    """A fixed (side, side, 3) block of standard normal noise that samples crop from (read-only)."""
    bank = np.random.default_rng(20221023).standard_normal((side, side, 3), dtype=np.float32)
    bank.setflags(write=False)
    return bank


def sensor_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Unit-variance Gaussian noise (height, width, 3): a random crop of a fixed noise bank with a
    random flip and channel order; ten times cheaper than drawing fresh normals per image."""
    side = max(512, 2 * max(height, width))
    bank = _noise_bank(side)
    y0, x0 = rng.integers(0, side - height + 1), rng.integers(0, side - width + 1)
    crop = bank[y0 : y0 + height, x0 : x0 + width][:, :, rng.permutation(3)]
    return crop[::-1] if rng.random() < 0.5 else crop


class Camera:
    """Camera model applied after the scene (and its defects) is drawn.

    Exposure (x0.88-1.12), white balance (per-channel gain, std 3 %), a linear illumination
    gradient (up to +-7 % across the image) and Gaussian sensor noise (std 0.4-1.6 % of full
    scale), then rounding to 8 bits. The parameters and the noise are drawn once, so ``capture``
    is a deterministic per-pixel function: pixels a defect did not change come out identical.
    """

    def __init__(self, rng: np.random.Generator, height: int, width: int) -> None:
        exposure = rng.uniform(0.88, 1.12)
        balance = np.clip(rng.normal(1.0, 0.03, 3), 0.9, 1.1).astype(np.float32)
        direction = rng.uniform(0, 2 * np.pi)
        amplitude = 2.0 * rng.uniform(0.0, 0.07) / max(height, width)
        ramp_x = (np.arange(width, dtype=np.float32) - width / 2) * np.float32(amplitude * np.cos(direction))
        ramp_y = (np.arange(height, dtype=np.float32) - height / 2) * np.float32(amplitude * np.sin(direction))
        self.gain = np.float32(exposure) * (1.0 + ramp_y[:, None, None] + ramp_x[None, :, None]) * balance
        self.noise = sensor_noise(rng, height, width) * np.float32(rng.uniform(0.004, 0.016))

    def capture(self, image: np.ndarray, box: tuple[slice, slice] = (slice(None), slice(None))) -> np.ndarray:
        """float (H, W, 3) scene in [0, 1] -> uint8 (H, W, 3) image; with ``box``, ``image`` is that
        crop of the frame and the same crop of the output is returned."""
        return np.clip(np.rint((image * self.gain[box] + self.noise[box]) * 255.0), 0, 255).astype(np.uint8)
