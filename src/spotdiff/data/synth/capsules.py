"""``capsules_synth``: several two-tone pill capsules on a tray (VisA's "multiple instances" domain).

Six capsules lie in a loose 2 x 3 arrangement (like a blister tray, or VisA's macaroni): each
is shifted at random within its cell (never touching another) and turned by up to 20 degrees.
A capsule is a shaded stadium (cylinder with hemispherical ends) with a specular highlight, a
seam between its red and cream halves and a soft contact shadow. Normal images vary in
placement, orientation, capsule length and thickness, tray texture and focus blur.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import _draw as d
from ._base import Scene, SynthObject

TRAY = (0.80, 0.82, 0.84)
BODY = (0.80, 0.16, 0.12)  # coloured half
CAP = (0.93, 0.88, 0.74)  # cream half
GRID = (2, 3)  # rows, columns of capsules


@dataclass(frozen=True)
class Capsule:
    """A capsule: centre (x, y) and half-length of its straight part ``half_len`` and ``radius`` in
    pixels, axis ``angle`` in radians. ``bite`` (x, y, r), if set, removes a disc from it;
    ``swell`` > 1 inflates the cream half (a misshapen capsule)."""

    x: float
    y: float
    angle: float
    half_len: float
    radius: float
    bite: tuple[float, float, float] | None = None
    swell: float = 1.0

    def local(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates -> (along-axis s, across-axis t) coordinates in pixels."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        dx, dy = x - self.x, y - self.y
        return dx * c + dy * s, -dx * s + dy * c

    def window(self, size: int, margin: float) -> tuple[slice, slice]:
        """Row and column slices of a size x size image holding the capsule plus ``margin`` pixels."""
        extent = self.half_len + self.radius * max(self.swell, 1.0) + margin
        rows = slice(max(0, int(self.y - extent)), min(size, int(np.ceil(self.y + extent)) + 1))
        cols = slice(max(0, int(self.x - extent)), min(size, int(np.ceil(self.x + extent)) + 1))
        return rows, cols

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        s, t = self.local(x, y)
        radius = np.where(s > 0, self.radius * self.swell, self.radius)
        dist = np.hypot(np.maximum(np.abs(s) - self.half_len, 0.0), t) - radius
        if self.bite is not None:
            bx, by, br = self.bite
            dist = np.maximum(dist, br - np.hypot(x - bx, y - by))
        return dist


@dataclass(frozen=True)
class CapsuleScene(Scene):
    size: int
    capsules: tuple[Capsule, ...]
    tray_seed: int
    blur_sigma: float

    def render(self) -> np.ndarray:
        s = self.size
        rng = np.random.default_rng(self.tray_seed)
        x, y = d.pixel_grid(s)
        tray_light = 1.0 + 0.025 * d.texture("grass", rng, s, zoom=2.0) + 0.03 * d.smooth_noise(rng, s, 4)
        img = d.shade(TRAY, tray_light)
        grain = d.texture("gravel", rng, s)
        for cap in self.capsules:
            # contact shadow: the capsule's coverage shifted down-right and blurred
            win = cap.window(s, 12)
            shadow = d.coverage(replace(cap, x=cap.x + 2.5, y=cap.y + 3.0).sdf(x[win], y[win]))
            img[win] = d.paint(img[win], 0.35 * d.blur(shadow, 2.5), (0.2, 0.2, 0.22))
        for cap in self.capsules:
            win = cap.window(s, 2)
            img[win] = self._draw_capsule(img[win], cap, x[win], y[win], grain[win])
        return np.clip(d.blur(img, self.blur_sigma), 0.0, 1.0).astype(np.float32)

    @staticmethod
    def _draw_capsule(img: np.ndarray, cap: Capsule, x: np.ndarray, y: np.ndarray, grain: np.ndarray) -> np.ndarray:
        sdf = cap.sdf(x, y)
        alpha = d.coverage(sdf)
        s, t = cap.local(x, y)
        radius = np.where(s > 0, cap.radius * cap.swell, cap.radius)
        axis_dist = np.hypot(np.maximum(np.abs(s) - cap.half_len, 0.0), t) / radius
        height = np.sqrt(np.clip(1.0 - axis_dist**2, 0.0, 1.0))
        light = 0.55 + 0.45 * height + 0.02 * grain
        color = np.where((s < 0)[..., None], np.asarray(BODY, np.float32), np.asarray(CAP, np.float32))
        body = color * light[..., None]
        highlight = 0.45 * np.exp(-((((t / radius) + 0.4) / 0.15) ** 2)) * (np.abs(s) < cap.half_len + 0.5 * cap.radius)
        body = body + highlight[..., None]
        seam = np.clip(1.0 - np.abs(s) / 0.8, 0.0, 1.0) * 0.35
        body = body * (1.0 - seam)[..., None]
        return d.paint(img, alpha, body)


class CapsulesSynth(SynthObject):
    name = "capsules_synth"
    defect_names = ("Crack", "Colour Spot", "Missing Part", "Misshape", "Scratch", "Leak")

    def scene(self, rng: np.random.Generator, size: int) -> CapsuleScene:
        # one capsule per cell of the grid, shifted within its cell so that none touch
        radius = size * 0.047
        cell_w, cell_h = size / GRID[1], size / GRID[0]
        capsules: list[Capsule] = []
        for row in range(GRID[0]):
            for col in range(GRID[1]):
                half_len = size * rng.uniform(0.058, 0.068)
                slack = max(0.0, min(cell_w, cell_h) / 2 - half_len - radius * 1.04 - 2)
                cx = (col + 0.5) * cell_w + rng.uniform(-slack, slack)
                cy = (row + 0.5) * cell_h + rng.uniform(-slack, slack)
                # red end left, turned by up to +-20 degrees
                angle = rng.uniform(-np.pi / 9, np.pi / 9)
                capsules.append(
                    Capsule(
                        float(cx), float(cy), float(angle), float(half_len), float(radius * rng.uniform(0.96, 1.04))
                    )
                )
        return CapsuleScene(
            size=size,
            capsules=tuple(capsules),
            tray_seed=int(rng.integers(2**31)),
            blur_sigma=float(rng.uniform(0.25, 0.7)),
        )

    def defect(self, scene: Scene, image: np.ndarray, defect_id: int, rng: np.random.Generator) -> np.ndarray:
        assert isinstance(scene, CapsuleScene)
        s = scene.size
        name = self.defect_names[defect_id - 1]
        k = int(rng.integers(len(scene.capsules)))
        cap = scene.capsules[k]
        x, y = d.pixel_grid(s)
        axis = np.array([np.cos(cap.angle), np.sin(cap.angle)])
        across = np.array([-axis[1], axis[0]])
        if name in ("Missing Part", "Misshape"):
            if name == "Missing Part":
                along = rng.choice([-1, 1]) * rng.uniform(0.3, 1.3) * cap.half_len
                side = rng.choice([-1, 1]) * cap.radius * rng.uniform(0.6, 1.1)
                bx, by = np.array([cap.x, cap.y]) + axis * along + across * side
                new = replace(cap, bite=(float(bx), float(by), float(cap.radius * rng.uniform(0.6, 1.0))))
            else:
                new = replace(
                    cap, swell=float(rng.uniform(1.2, 1.35)), half_len=cap.half_len * float(rng.uniform(0.8, 0.9))
                )
            changed = replace(scene, capsules=scene.capsules[:k] + (new,) + scene.capsules[k + 1 :])
            clean, altered = scene.image(), changed.image()
            return np.where(np.abs(altered - clean).max(axis=2, keepdims=True) > 0, altered, image)
        inside = np.clip(-cap.sdf(x, y) / 2.0, 0.0, 1.0)  # 1 at least 2 px inside the outline
        start = (
            np.array([cap.x, cap.y])
            + axis * rng.uniform(-1, 1) * cap.half_len
            + across * rng.uniform(-0.6, 0.6) * cap.radius
        )
        if name in ("Crack", "Scratch"):
            if name == "Crack":  # dark jagged line across the capsule
                pts = d.random_walk(
                    rng,
                    tuple(start - across * cap.radius),
                    np.arctan2(across[1], across[0]) + rng.normal(0, 0.3),
                    int(rng.integers(4, 8)),
                    cap.radius * 0.35,
                    0.6,
                )
                width, color = rng.uniform(2.0, 3.0), (0.12, 0.06, 0.05)
            else:  # light thin scratch, mostly along the axis
                pts = d.random_walk(
                    rng, tuple(start), cap.angle + rng.normal(0, 0.5), int(rng.integers(3, 6)), cap.radius * 0.4, 0.15
                )
                width, color = rng.uniform(1.3, 2.0), (0.98, 0.97, 0.95)
            alpha = d.pil_mask(
                s,
                lambda dr, kk: dr.line(d.scaled(pts, kk), fill=255, width=max(1, round(width * kk)), joint="curve"),
                4,
            )
            return d.paint(image, alpha * inside * 0.9, color)
        if name == "Colour Spot":
            cx, cy = start
            radius = cap.radius * rng.uniform(0.5, 0.9)
            blob = np.hypot(x - cx, y - cy) / radius + 0.25 * d.smooth_noise(rng, s, 24)
            alpha = np.clip((1.0 - blob) * 3.0, 0, 1) * inside
            color = [(0.35, 0.22, 0.08), (0.15, 0.35, 0.15), (0.25, 0.2, 0.45)][int(rng.integers(3))]
            return d.paint(image, alpha.astype(np.float32) * 0.85, color)
        # Leak: a translucent puddle of capsule fill on the tray beside the capsule
        side = rng.choice([-1, 1])
        cx, cy = (
            np.array([cap.x, cap.y])
            + across * side * cap.radius * rng.uniform(1.3, 1.8)
            + axis * rng.uniform(-1, 1) * cap.half_len
        )
        radius = cap.radius * rng.uniform(1.0, 1.6)
        blob = np.hypot(x - cx, y - cy) / radius + 0.3 * d.smooth_noise(rng, s, 16)
        alpha = np.clip((1.0 - blob) * 4.0, 0, 1)
        for other in scene.capsules:  # the puddle lies under the capsules
            alpha = alpha * (1.0 - d.coverage(other.sdf(x, y) - 1.0))
        return d.paint(image, alpha.astype(np.float32) * 0.6, (0.75, 0.45, 0.15))
