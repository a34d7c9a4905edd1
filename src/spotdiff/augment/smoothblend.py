"""SmoothBlend: the local perturbation of SPot-the-Difference (SPD) pre-training.

A small patch is cut from the same image, colour-jittered and pasted at a random place with a
Gaussian-smoothed alpha mask::

    x_bar = (1 - alpha) * x + alpha * u

where ``u`` is the layer holding the jittered patch and ``alpha`` is 1 on the patch and 0 elsewhere,
smoothed by a Gaussian.

Design choices (the paper leaves them open):

* **Footprint-bounded alpha, no halo.** ``alpha`` is the hard patch box eroded by ``truncate * sigma``
  on every side and then convolved with a Gaussian of std ``sigma`` -- computed in closed form as an
  outer product of two 1-D erf profiles (exactly the continuous Gaussian blur of a box, evaluated at
  pixel centres), so every sample gets its own ``sigma`` without a per-sample convolution. The result
  is finally multiplied by the hard footprint. ``alpha`` is therefore exactly 0 outside the pasted box
  (pixels there are bit-identical to the input) and falls smoothly to ``Phi(-truncate)`` (0.0013 for
  ``truncate=3``, below one 8-bit grey level) at its border. Because ``u`` holds the patch on the
  whole footprint, every output pixel is a convex combination of ``x`` and the jittered patch: no
  dark halo from blending towards the zero layer.
* **Colour jitter** of the patch: brightness, contrast, saturation, hue factors drawn per sample
  uniformly from ``[1 - j, 1 + j]`` (hue: ``[-j, j]``), applied in this fixed order with
  torchvision's definitions (contrast uses the mean grey level of the patch itself), clamped to
  [0, 1] after each step.
* **Geometry**: the *perturbed* area -- the mass of ``alpha`` as a fraction of the image -- is uniform
  in ``area``; the hard box is sized to give that mass (at the default ``sigma`` it is 1.9-3.7x
  the mass, 2.7x on average, because of the erosion and the soft edge). Aspect ``h / w`` log-uniform in
  ``aspect``; source and destination boxes uniform and independent inside the image.
* Only a window of the size of the largest patch of the batch is processed; the output is one
  ``scatter`` into a copy of the input, so the cost hardly depends on the image size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as F

from spotdiff.errors import ConfigError

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
MIN_SIGMA_PX = 0.5
"""Floor of the Gaussian std, in pixels (ours): below half a pixel the whole soft edge
(``2 * truncate * sigma`` = 3 px at the floor) collapses into one or two pixels and the paste is
hard in effect (at 32 px the area rule alone gives sigma ~ 0.29 px)."""
MIN_PEAK_ALPHA = 0.9
"""Smallest accepted peak of ``alpha`` (the patch must really be pasted somewhere)."""
MAX_MASS_ERROR = 0.25
"""Largest accepted relative error of the alpha mass against the drawn area (pixel rounding)."""
GRID = (21, 33)
"""Areas x aspects (evenly / log-evenly over the ranges, ends included) on which sizes are checked."""


# ----------------------------------------------------------------------------- colour jitter
def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 1, H, W)`` luma with torchvision's weights."""
    r, g, b = images.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of ``(B, 3, H, W)`` images in [0, 1] by ``shift`` (B,) turns (as adjust_hue)."""
    maxc = images.amax(dim=1, keepdim=True)
    minc = images.amin(dim=1, keepdim=True)
    delta = maxc - minc
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, 1.0), 0.0)
    safe = torch.where(delta > 0, delta, 1.0)
    r, g, b = images.unbind(1)
    r, g, b = r.unsqueeze(1), g.unsqueeze(1), b.unsqueeze(1)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, hue / 6.0, 0.0)
    hue = torch.remainder(hue + shift.view(-1, 1, 1, 1), 1.0)
    # HSV -> RGB: c_n = v - v * s * clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6, n = 5, 3, 1.
    n = torch.tensor([5.0, 3.0, 1.0], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * hue, 6.0)
    return maxc - maxc * sat * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def color_jitter_batch(
    images: torch.Tensor,
    brightness: torch.Tensor | None,
    contrast: torch.Tensor | None,
    saturation: torch.Tensor | None,
    hue: torch.Tensor | None,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample colour jitter of ``(B, 3, H, W)`` images in [0, 1], vectorised over the batch.

    Factors are ``(B,)`` tensors with torchvision's meaning (``adjust_brightness``, ``adjust_contrast``,
    ``adjust_saturation``, ``adjust_hue``), applied in that order, each result clamped to [0, 1];
    None skips that step. ``region`` (B, 1, H, W) in {0, 1}, if given, restricts the contrast mean
    to those pixels.
    """
    view = (-1, 1, 1, 1)
    x = images
    if brightness is not None:
        x = (x * brightness.view(view)).clamp(0.0, 1.0)
    if contrast is not None:
        gray = _grayscale(x)
        if region is None:
            mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        else:
            area = region.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1)
            mean = (gray * region).sum(dim=(1, 2, 3), keepdim=True) / area
        c = contrast.view(view)
        x = (c * x + (1.0 - c) * mean).clamp(0.0, 1.0)
    if saturation is not None:
        s = saturation.view(view)
        x = (s * x + (1.0 - s) * _grayscale(x)).clamp(0.0, 1.0)
    if hue is not None:
        x = _shift_hue(x, hue).clamp(0.0, 1.0)
    return x


# ----------------------------------------------------------------------------- parameters
@dataclass
class BlendParams:
    """Per-sample SmoothBlend parameters; every field is a ``(B,)`` tensor on the images' device.

    Boxes are ``h x w`` pixels; ``src_*``/``dst_*`` are their top-left corners; ``sigma`` is the
    Gaussian std in pixels (0 means a hard paste); the rest are the colour-jitter factors.
    """

    h: torch.Tensor
    w: torch.Tensor
    src_y: torch.Tensor
    src_x: torch.Tensor
    dst_y: torch.Tensor
    dst_x: torch.Tensor
    sigma: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor

    def __getitem__(self, index: int | slice | torch.Tensor) -> BlendParams:
        """The parameters of a subset of samples (``params[i : i + 1]`` for one)."""
        return BlendParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def __len__(self) -> int:
        return int(self.h.shape[0])

    def footprint(self, height: int, width: int) -> torch.Tensor:
        """``(B, 1, H, W)`` bool: the hard destination box of each sample."""
        ys = torch.arange(height, device=self.h.device).view(1, -1, 1)
        xs = torch.arange(width, device=self.h.device).view(1, 1, -1)
        dy, dx = self.dst_y.view(-1, 1, 1), self.dst_x.view(-1, 1, 1)
        h, w = self.h.view(-1, 1, 1), self.w.view(-1, 1, 1)
        inside = (ys >= dy) & (ys < dy + h) & (xs >= dx) & (xs < dx + w)
        return inside.unsqueeze(1)


def _pair(
    value: float | Sequence[float], name: str, low: float, high: float, open_range: bool = False
) -> tuple[float, float]:
    """``(min, max)`` from a number or a pair, within ``[low, high]`` (``(low, high)`` if ``open_range``)."""
    lo, hi = (float(value), float(value)) if isinstance(value, (int, float)) else tuple(map(float, value))
    inside = low < lo <= hi < high if open_range else low <= lo <= hi <= high
    if not inside:
        lt = "<" if open_range else "<="
        raise ConfigError(f"SmoothBlend {name}={value!r}: need {low:g} {lt} min <= max {lt} {high:g}")
    return lo, hi


class SmoothBlend(nn.Module):
    """Batched SmoothBlend of ``(B, 3, H, W)`` images (CPU or CUDA), random parameters per sample.

    Args:
        area: range of the perturbed area -- the mass of alpha, ``alpha.sum() / (H * W)`` -- as a
            fraction of the image area, in (0, 1) (default 0.5 %-1 %, the paper's patch size).
        aspect: range of the patch aspect ratio ``h / w`` (sampled log-uniformly).
        sigma: Gaussian std of the alpha mask as a fraction of the patch's shorter side; 0 pastes
            with hard edges.
        truncate: the hard box is eroded by ``truncate * sigma`` before blurring (alpha at the
            footprint border is ``Phi(-truncate)``).
        jitter: colour-jitter strengths (brightness, contrast, saturation, hue) of the patch.
        mean, std: per-channel normalisation of the input images. None (default): images are in
            [0, 1]. With ImageNet ``mean``/``std`` the images are normalised tensors; the patch is
            jittered in [0, 1] space and the blend is done in the input's space.
    """

    def __init__(
        self,
        area: Sequence[float] = (0.005, 0.01),
        aspect: Sequence[float] = (0.3, 3.3),
        sigma: float = 0.08,
        truncate: float = 3.0,
        jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        min_sigma_px: float = MIN_SIGMA_PX,
    ) -> None:
        super().__init__()
        if not (math.isfinite(min_sigma_px) and min_sigma_px >= 0):
            raise ConfigError(f"SmoothBlend min_sigma_px={min_sigma_px!r}: need a finite number >= 0")
        self.min_sigma_px = float(min_sigma_px) if sigma > 0 else 0.0
        self.area = _pair(area, "area", 0.0, 1.0, open_range=True)
        self.aspect = _pair(aspect, "aspect", 1e-3, 1e3)
        if not (sigma >= 0 and truncate > 0):
            raise ConfigError(f"SmoothBlend sigma={sigma!r}, truncate={truncate!r}: need sigma >= 0 and truncate > 0")
        if truncate * sigma >= 0.5:
            raise ConfigError(f"SmoothBlend sigma={sigma!r}: truncate * sigma must be < 0.5 (the eroded box vanishes)")
        # alpha mass of a box covering a whole square image: the largest area that can be asked for
        largest = (1.0 - 2.0 * truncate * sigma) ** 2 if sigma > 0 else 1.0
        if self.area[1] > largest:
            raise ConfigError(
                f"SmoothBlend area={area!r}: with sigma={sigma} the perturbed area "
                f"(alpha mass) can be at most {largest:.3g} of the image; need max <= {largest:.3g}"
            )
        self.sigma = float(sigma)
        self.truncate = float(truncate)
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ConfigError(
                f"SmoothBlend jitter={jitter!r}: need 4 values >= 0 (brightness, contrast, saturation, hue <= 0.5)"
            )
        self.jitter = tuple(float(j) for j in jitter)
        if (mean is None) != (std is None):
            raise ConfigError("SmoothBlend: give both mean and std, or neither")
        self.mean: torch.Tensor | None  # (1, 3, 1, 1) buffers, or None for images in [0, 1]
        self.std: torch.Tensor | None
        for key, value in (("mean", mean), ("std", std)):
            channel = None if value is None else torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer(key, channel, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"area={self.area}, aspect={self.aspect}, sigma={self.sigma}, truncate={self.truncate}, "
            f"jitter={self.jitter}, normalised={self.mean is not None}"
        )

    # -- the smallest image
    def check_size(self, height: int, width: int) -> None:
        """ConfigError unless every box this blend can draw on ``height x width`` images is smooth.

        Checked on a grid of areas and aspects (:data:`GRID`, the ends included): the peak of
        ``alpha`` must reach :data:`MIN_PEAK_ALPHA` and the alpha mass must be within
        :data:`MAX_MASS_ERROR` of the drawn area, with ``sigma >= min_sigma_px``. Cached per size.
        """
        problem = self._size_problem(int(height), int(width)) if self._size_problem_cached_hw(height, width) else ""
        if problem:
            raise ConfigError(problem)

    def _size_problem_cached_hw(self, height: int, width: int) -> bool:
        if height == width:
            return self._size_problem_cached(int(height))
        peak, error = self.worst_case(int(height), int(width))
        return not (peak >= MIN_PEAK_ALPHA and error <= MAX_MASS_ERROR)

    def _size_problem(self, height: int, width: int) -> str:
        """Why SmoothBlend cannot hold its stated area and smoothness at ``height x width`` ('' if it can)."""
        peak, error = self.worst_case(height, width)
        if peak >= MIN_PEAK_ALPHA and error <= MAX_MASS_ERROR:
            return ""
        return (
            f"SmoothBlend image size {height}x{width}: too small for area={self.area}, aspect={self.aspect}, "
            f"sigma={self.sigma}, min_sigma_px={self.min_sigma_px} (lowest peak alpha {peak:.2f}, "
            f"need >= {MIN_PEAK_ALPHA}; alpha mass off by up to {error:.0%}, need <= {MAX_MASS_ERROR:.0%}); "
            "use larger images or a narrower aspect range (defaults hold from 91 px, aspect 0.5-2 from 65 px; "
            "SmoothBlend.smallest_size() computes it)"
        )

    def worst_case(self, height: int, width: int) -> tuple[float, float]:
        """``(lowest peak alpha, largest relative alpha-mass error)`` over a grid of boxes on ``height x width``.

        The grid: :data:`GRID` areas (evenly over ``area``) x aspects (log-evenly over ``aspect``),
        ends included. Peak and mass are exact for the drawn integer boxes (closed-form alpha).
        """
        if self.sigma == 0:
            return 1.0, 0.0
        areas = torch.linspace(self.area[0], self.area[1], GRID[0], dtype=torch.float64)
        log_lo, log_hi = math.log(self.aspect[0]), math.log(self.aspect[1])
        ratios = torch.exp(torch.linspace(log_lo, log_hi, GRID[1], dtype=torch.float64))
        area, ratio = (t.reshape(-1) for t in torch.meshgrid(areas, ratios, indexing="ij"))
        target = area * (height * width)
        h, w = self._box_for_mass(target, ratio, height, width)
        error = float(((self.alpha_mass(h, w) - target).abs() / target).max())
        sigma = self._sigma_px(h, w)
        cy, cx = ((h - 1) / 2).floor().long(), ((w - 1) / 2).floor().long()
        peak = self._profile(cy.view(-1, 1), h, sigma) * self._profile(cx.view(-1, 1), w, sigma)
        return float(peak.min()), error

    def smallest_size(self, limit: int = 192) -> int:
        """The smallest square side (px) from which on :meth:`check_size` passes for every side up to
        ``limit`` (pixel rounding makes some single sizes below it pass too; errors shrink with size)."""
        last_failing = max((side for side in range(4, limit + 1) if self._size_problem_cached(side)), default=3)
        return last_failing + 1

    def _size_problem_cached(self, side: int) -> bool:
        cache = self.__dict__.setdefault("_checked_sizes", {})
        if (side, side) not in cache:
            peak, error = self.worst_case(side, side)
            cache[(side, side)] = "" if peak >= MIN_PEAK_ALPHA and error <= MAX_MASS_ERROR else "fails"
        return bool(cache[(side, side)])

    # -- parameters
    def sample(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> BlendParams:
        """Draw parameters for ``batch`` images of ``height x width`` from ``generator``.

        The area drawn from ``self.area`` is the mass of ``alpha`` (``alpha.sum() / (H * W)``, the
        area actually perturbed), not the hard box: the box is sized so that its smoothed, eroded
        alpha has that mass (see :meth:`_box_for_mass`). Random numbers come from ``generator`` on
        its own device (the global CPU RNG when None) and are moved to ``device``: the same seed
        gives the same parameters on CPU and CUDA.
        """
        rng_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(10, batch, generator=generator, device=rng_device, dtype=torch.float64)
        u = u.to(device or rng_device)
        target = (self.area[0] + (self.area[1] - self.area[0]) * u[0]) * (height * width)
        log_lo, log_hi = math.log(self.aspect[0]), math.log(self.aspect[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[1])
        h, w = self._box_for_mass(target, ratio, height, width)
        src_y = torch.floor(u[2] * (height - h + 1))
        src_x = torch.floor(u[3] * (width - w + 1))
        dst_y = torch.floor(u[4] * (height - h + 1))
        dst_x = torch.floor(u[5] * (width - w + 1))
        b, c, s, hj = self.jitter

        def factor(x: torch.Tensor, j: float) -> torch.Tensor:
            return (1.0 - j + 2.0 * j * x).clamp_min(0.0).float()

        long = torch.long
        return BlendParams(
            h=h.to(long),
            w=w.to(long),
            src_y=src_y.to(long),
            src_x=src_x.to(long),
            dst_y=dst_y.to(long),
            dst_x=dst_x.to(long),
            sigma=self._sigma_px(h, w),
            brightness=factor(u[6], b),
            contrast=factor(u[7], c),
            saturation=factor(u[8], s),
            hue=((2.0 * u[9] - 1.0) * hj).float(),
        )

    def _box_for_mass(
        self, target: torch.Tensor, ratio: torch.Tensor, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer box sides ``(h, w)`` whose alpha mass is ``target`` pixels, aspect ``h / w = ratio``.

        Continuous start: eroding by ``truncate * sigma`` with ``sigma = self.sigma * min(h, w)``
        leaves a ``(h - k m) x (w - k m)`` box (``k = 2 * truncate * sigma_fraction``, ``m`` the
        shorter side) whose blur keeps its mass, so the shorter side is
        ``sqrt(target / ((1 - k) (rho - k)))`` with ``rho = max(ratio, 1 / ratio)``. Three rescaling
        steps then correct for the pixel grid with the exact discrete mass :meth:`alpha_mass`, and the
        sides are rounded to pixels (the only remaining error) and clipped to the image.
        """
        k = 2.0 * self.truncate * self.sigma if self.sigma > 0 else 0.0
        rho = torch.maximum(ratio, 1.0 / ratio)
        short = torch.sqrt(target / ((1.0 - k) * (rho - k)))
        if self.min_sigma_px > 0:  # floored sigma: (m - e)(rho m - e) = target, e = 2 truncate min_sigma_px
            e = 2.0 * self.truncate * self.min_sigma_px
            floored = (e * (1 + rho) + torch.sqrt((e * (1 + rho)) ** 2 - 4 * rho * (e * e - target))) / (2 * rho)
            short = torch.where(self.sigma * short < self.min_sigma_px, floored, short)
        h = torch.where(ratio >= 1, short * rho, short)
        w = torch.where(ratio >= 1, short, short * rho)

        def to_pixels(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return h.round().clamp(1, height), w.round().clamp(1, width)

        for _ in range(4):
            mass = self.alpha_mass(*to_pixels(h, w))
            scale = torch.sqrt(target / mass.clamp_min(1e-12)).clamp(0.5, 2.0)
            h, w = h * scale, w * scale
        # Of the nine integer boxes around the rounded (h, w), the one whose mass is closest to the target.
        best_h, best_w = to_pixels(h, w)
        best_err = (self.alpha_mass(best_h, best_w) - target).abs()
        round_h, round_w = best_h, best_w
        for dh, dw in ((a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if a or b):
            ch, cw = (round_h + dh).clamp(1, height), (round_w + dw).clamp(1, width)
            err = (self.alpha_mass(ch, cw) - target).abs()
            better = err < best_err
            best_h, best_w, best_err = (
                torch.where(better, ch, best_h),
                torch.where(better, cw, best_w),
                torch.minimum(err, best_err),
            )
        return best_h, best_w

    def _sigma_px(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``(B,)`` Gaussian std in pixels: ``sigma * min(h, w)``, floored at ``min_sigma_px`` (0 if sigma is 0)."""
        if self.sigma == 0:
            return torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        return (self.sigma * torch.minimum(h, w)).clamp_min(self.min_sigma_px).float()

    def alpha_mass(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``sum(alpha)`` in pixels of ``(B,)`` boxes of integer sides ``h x w`` (alpha is separable)."""
        sigma = self._sigma_px(h, w)
        longest = int(max(h.max(), w.max()))
        coord = torch.arange(longest, device=h.device).view(1, -1)

        def total(length: torch.Tensor) -> torch.Tensor:
            inside = coord < length.view(-1, 1)
            return (self._profile(coord, length, sigma) * inside).sum(dim=1).double()

        return total(h) * total(w)

    # -- application (named `blend`, not `apply`: that would shadow nn.Module.apply(fn) of every parent)
    def blend(
        self, images: torch.Tensor, params: BlendParams, with_alpha: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Blend ``images`` (B, 3, H, W) with ``params``; returns ``(blended, alpha (B, 1, H, W) or None)``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"SmoothBlend expects (B, 3, H, W) images, got {tuple(images.shape)}")
        bsz, _, height, width = images.shape
        if len(params) != bsz:
            raise ValueError(f"SmoothBlend: {len(params)} parameter sets for {bsz} images")
        dev = images.device
        # The window: the largest box of the batch, placed inside the image over each destination box.
        ph, pw = int(params.h.max()), int(params.w.max())
        oy = torch.minimum(params.dst_y, torch.full_like(params.dst_y, height - ph))
        ox = torch.minimum(params.dst_x, torch.full_like(params.dst_x, width - pw))
        wy = oy.view(-1, 1) + torch.arange(ph, device=dev)  # (B, ph) image rows of the window
        wx = ox.view(-1, 1) + torch.arange(pw, device=dev)  # (B, pw)
        py = wy - params.dst_y.view(-1, 1)  # patch-local coordinates
        px = wx - params.dst_x.view(-1, 1)
        in_y = (py >= 0) & (py < params.h.view(-1, 1))
        in_x = (px >= 0) & (px < params.w.view(-1, 1))
        footprint = (in_y.unsqueeze(2) & in_x.unsqueeze(1)).unsqueeze(1)  # (B, 1, ph, pw)

        # Flat indices into (B, 3 * H * W), one per channel: contiguous indices gather fastest.
        plane = height * width
        channel_offset = (torch.arange(3, device=dev) * plane).view(1, 3, 1)
        window_index = (wy.unsqueeze(2) * width + wx.unsqueeze(1)).view(bsz, 1, ph * pw)
        window_index = (window_index + channel_offset).view(bsz, 3 * ph * pw)
        sy = (params.src_y.view(-1, 1) + py).clamp(0, height - 1)
        sx = (params.src_x.view(-1, 1) + px).clamp(0, width - 1)
        source_index = (sy.unsqueeze(2) * width + sx.unsqueeze(1)).view(bsz, 1, ph * pw)
        source_index = (source_index + channel_offset).view(bsz, 3 * ph * pw)
        flat = images.reshape(bsz, 3 * plane)
        x_win = flat.gather(1, window_index).view(bsz, 3, ph, pw)
        patch = flat.gather(1, source_index).view(bsz, 3, ph, pw)

        work = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype
        patch, x_win = patch.to(work), x_win.to(work)
        norm = None if self.mean is None or self.std is None else (self.mean.to(dev, work), self.std.to(dev, work))
        if norm is not None:
            patch = patch * norm[1] + norm[0]
        region = footprint.to(work)
        factors = [
            f.to(work) if strength > 0 else None
            for f, strength in zip((params.brightness, params.contrast, params.saturation, params.hue), self.jitter)
        ]
        brightness, contrast, saturation, hue = factors
        patch = color_jitter_batch(patch, brightness, contrast, saturation, hue, region=region)
        if norm is not None:
            patch = (patch - norm[0]) / norm[1]

        alpha = self._alpha(py, px, params).to(work) * region
        blended = (x_win + alpha * (patch - x_win)).to(images.dtype)
        out = images.clone(memory_format=torch.contiguous_format)
        out.view(bsz, 3 * plane).scatter_(1, window_index, blended.view(bsz, -1))
        if not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)  # keep the caller's layout
        if not with_alpha:
            return out, None
        alpha_full = torch.zeros(bsz, plane, device=dev, dtype=work)
        alpha_full.scatter_(1, window_index[:, : ph * pw], alpha.view(bsz, -1))
        return out, alpha_full.view(bsz, 1, height, width)

    def _profile(self, coord: torch.Tensor, length: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """1-D alpha profile ``(B, L)`` at integer patch coordinates ``coord`` of boxes ``length`` (B,).

        The box ``[margin, length - margin)``, ``margin = truncate * sigma``, convolved with
        ``N(0, sigma^2)`` and evaluated at pixel centres; a hard 0/1 box when ``self.sigma == 0``.
        """
        length = length.view(-1, 1)
        if self.sigma == 0:
            return ((coord >= 0) & (coord < length)).float()
        sigma = sigma.view(-1, 1)
        margin = self.truncate * sigma
        centre = coord.float() + 0.5
        scale = 1.0 / (sigma * math.sqrt(2.0))
        lo = torch.erf((centre - margin) * scale)
        hi = torch.erf((centre - (length.float() - margin)) * scale)
        return (0.5 * (lo - hi)).clamp(0.0, 1.0)

    def _alpha(self, py: torch.Tensor, px: torch.Tensor, params: BlendParams) -> torch.Tensor:
        """``(B, 1, ph, pw)`` Gaussian-smoothed eroded box (before the footprint cut), float32."""
        prof_y = self._profile(py, params.h, params.sigma)
        prof_x = self._profile(px, params.w, params.sigma)
        return (prof_y.unsqueeze(2) * prof_x.unsqueeze(1)).unsqueeze(1)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None, return_mask: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """SmoothBlend every image of the batch with its own random patch.

        Args:
            images: ``(B, 3, H, W)`` float, in [0, 1] (or normalised with this module's mean/std).
            generator: source of randomness (see :meth:`sample`); the global RNG when None.
            return_mask: also return ``alpha`` (B, 1, H, W) in [0, 1].
        """
        self.check_size(images.shape[2], images.shape[3])
        params = self.sample(images.shape[0], images.shape[2], images.shape[3], generator, images.device)
        with torch.no_grad():
            out, alpha = self.blend(images, params, with_alpha=return_mask)
        if not return_mask:
            return out
        assert alpha is not None  # apply(with_alpha=True) always returns it
        return out, alpha


class SmoothBlendTransform:
    """Single-image SmoothBlend for data pipelines (torchvision-v2 style; global torch RNG).

    Accepts a PIL image (returns a PIL image) or a ``(3, H, W)`` float tensor in [0, 1] (returns a
    tensor). Keyword arguments are those of :class:`SmoothBlend`.
    """

    def __init__(self, **kwargs: Any) -> None:  # SmoothBlend's keyword arguments, checked there
        self.blend = SmoothBlend(**kwargs)

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        if isinstance(image, Image.Image):
            tensor = F.to_dtype(F.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
            out = self.blend(tensor.unsqueeze(0))[0]
            return F.to_pil_image((out * 255.0).round().clamp(0, 255).to(torch.uint8))
        is_rgb = isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3
        if not (is_rgb and image.is_floating_point()):
            raise TypeError("SmoothBlendTransform expects a PIL image or a (3, H, W) float tensor in [0, 1]")
        return self.blend(image.unsqueeze(0))[0]

    def __repr__(self) -> str:
        return f"SmoothBlendTransform({self.blend.extra_repr()})"
