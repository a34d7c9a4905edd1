"""``cashew_synth``: one roughly centred cashew kernel (VisA's "single instance" domain).

The kernel is a tapered crescent (a thick arc whose width swells towards the middle and one
end) with a dome-like shading, a fine surface grain, a darker rim and an irregular outline,
lying on a dark textured cloth with a soft shadow. Normal images vary in position (+-4 %),
rotation (+-12 degrees), size, curvature, outline irregularity, tint and focus blur.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import _draw as d
from ._base import Scene, SynthObject

KERNEL = (0.88, 0.76, 0.56)
CLOTH = (0.17, 0.17, 0.18)


@dataclass(frozen=True)
class CashewScene(Scene):
    size: int
    center: tuple[float, float]
    angle: float
    arc_radius: float  # pixels
    half_span: float  # radians, half the angular extent of the crescent
    width: float  # pixels, half-thickness in the middle
    tint: float
    surface_seed: int
    blur_sigma: float
    cuts: tuple[tuple[float, float, float], ...] = ()  # discs (x, y, r) broken off
    gaps: tuple[tuple[float, float, float, float], ...] = ()  # cracks: point, direction, width

    def geometry(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Signed distance to the kernel outline (pixels), position along it t in [0, 1], and the
        local half-thickness (pixels), each (size, size); computed once per scene."""
        return self.cached("_geometry", self._geometry)

    def _geometry(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        size = self.size
        c, s = np.cos(self.angle), np.sin(self.angle)
        # evaluate only in the bounding box of the (rotated) crescent
        reach = self.width * 1.12 + 4.0
        half_x = self.arc_radius * np.sin(self.half_span) + reach
        top, bottom = self.arc_radius * (np.cos(self.half_span) - 0.75) - reach, self.arc_radius * 0.25 + reach
        corners = (
            d.rotate(np.array([[-half_x, top], [half_x, top], [half_x, bottom], [-half_x, bottom]]), self.angle)
            + self.center
        )
        (x0, y0), (x1, y1) = np.floor(corners.min(axis=0)), np.ceil(corners.max(axis=0)) + 1
        win = (slice(int(max(0, y0)), int(min(size, y1))), slice(int(max(0, x0)), int(min(size, x1))))
        x, y = (g[win] for g in d.pixel_grid(size))
        dx, dy = x - self.center[0], y - self.center[1]
        lx, ly = dx * c + dy * s, -dx * s + dy * c
        # arc centre above the object's centre so the crescent opens upwards
        ax, ay = lx, ly + self.arc_radius * 0.75
        theta = np.arctan2(ax, ay)  # 0 points straight down
        t_angle = np.clip(theta, -self.half_span, self.half_span)
        px, py = self.arc_radius * np.sin(t_angle), self.arc_radius * np.cos(t_angle)
        t_win = (t_angle + self.half_span) / (2 * self.half_span)
        hw_win = self.width * (0.62 + 0.38 * np.sin(np.pi * t_win) ** 0.7 + 0.12 * t_win)
        rng = np.random.default_rng(self.surface_seed)
        sdf_win = np.hypot(ax - px, ay - py) - hw_win + 1.2 * d.smooth_noise(rng, size, 10)[win]
        sdf = np.full((size, size), 1e3, np.float32)
        t = np.zeros((size, size), np.float32)
        half_width = np.full((size, size), self.width, np.float32)
        sdf[win], t[win], half_width[win] = sdf_win, t_win, hw_win
        if self.cuts:
            xf, yf = d.pixel_grid(size)
            for cx, cy, r in self.cuts:
                sdf = np.maximum(sdf, r - np.hypot(xf - cx, yf - cy))
        return sdf, t, half_width

    def outline(self) -> np.ndarray:
        """Signed distance to the outline including cracks (``gaps``), (size, size) pixels."""
        return self.cached("_outline", self._outline)

    def _outline(self) -> np.ndarray:
        sdf = self.geometry()[0]
        x, y = d.pixel_grid(self.size)
        for gx, gy, angle, w in self.gaps:
            # a crack: a band of width w through (gx, gy) along direction angle, ragged by +-0.6 px
            across = np.abs(-(x - gx) * np.sin(angle) + (y - gy) * np.cos(angle))
            wobble = 0.6 * d.smooth_noise(np.random.default_rng(int(gx * 1000 + gy)), self.size, 24)
            sdf = np.maximum(sdf, w / 2 + wobble - across)
        return sdf.astype(np.float32)

    def render(self) -> np.ndarray:
        s = self.size
        rng = np.random.default_rng(self.surface_seed + 1)
        sdf, t, half_width = self.geometry()
        outline = self.outline()
        img = d.shade(CLOTH, 1.0 + 0.12 * d.texture("grass", rng, s) + 0.04 * d.smooth_noise(rng, s, 3))
        shadow = d.blur(np.roll(d.coverage(outline), (4, 3), axis=(0, 1)), 3.0)
        img = d.paint(img, 0.5 * shadow, (0.02, 0.02, 0.02))
        depth = np.clip(-sdf / half_width, 0.0, 1.0)
        height = np.sqrt(depth)
        grain = d.texture("gravel", rng, s) + 0.6 * d.smooth_noise(rng, s, 24)
        light = self.tint * (0.62 + 0.38 * height + 0.018 * grain)
        kernel = d.shade(KERNEL, light)
        # darker, browner rim and ends
        rim = np.clip(1.0 - depth * 3.0, 0, 1) * 0.25 + 0.12 * np.abs(t - 0.5) * 2
        kernel = d.paint(kernel, rim.astype(np.float32), (0.62, 0.45, 0.26))
        img = d.paint(img, d.coverage(outline), kernel)
        return np.clip(d.blur(img, self.blur_sigma), 0.0, 1.0).astype(np.float32)

    def point_inside(self, rng: np.random.Generator, margin: float) -> tuple[float, float]:
        """A random pixel at least ``margin`` pixels inside the outline."""
        sdf = self.outline()
        ys, xs = np.nonzero(sdf < -margin)
        k = int(rng.integers(len(xs)))
        return float(xs[k]), float(ys[k])

    def point_on_outline(self, rng: np.random.Generator) -> tuple[float, float]:
        ys, xs = np.nonzero(np.abs(self.outline()) < 1.0)
        k = int(rng.integers(len(xs)))
        return float(xs[k]), float(ys[k])


class CashewSynth(SynthObject):
    name = "cashew_synth"
    defect_names = (
        "Burnt",
        "Corner or Edge Breakage",
        "Different Colour Spot",
        "Middle Breakage",
        "Small Holes",
        "Small Scratches",
    )

    def scene(self, rng: np.random.Generator, size: int) -> CashewScene:
        return CashewScene(
            size=size,
            center=(size / 2 + rng.normal(0, 0.02 * size), size / 2 + rng.normal(0, 0.02 * size)),
            angle=float(rng.normal(0, np.deg2rad(6))),
            arc_radius=size * float(rng.uniform(0.26, 0.3)),
            half_span=float(rng.uniform(1.0, 1.15)),
            width=size * float(rng.uniform(0.105, 0.12)),
            tint=float(rng.uniform(0.94, 1.04)),
            surface_seed=int(rng.integers(2**31)),
            blur_sigma=float(rng.uniform(0.25, 0.7)),
        )

    def defect(self, scene: Scene, image: np.ndarray, defect_id: int, rng: np.random.Generator) -> np.ndarray:
        assert isinstance(scene, CashewScene)
        s = scene.size
        name = self.defect_names[defect_id - 1]
        x, y = d.pixel_grid(s)
        if name in ("Corner or Edge Breakage", "Middle Breakage"):
            if name == "Corner or Edge Breakage":
                ex, ey = scene.point_on_outline(rng)
                changed = replace(scene, cuts=scene.cuts + ((ex, ey, s * float(rng.uniform(0.045, 0.08))),))
            else:
                # a crack across the kernel: along the arc's radius through a random inner point
                gx, gy = scene.point_inside(rng, s * 0.03)
                ox, oy = d.rotate(np.array([[0.0, -0.75 * scene.arc_radius]]), scene.angle)[0] + scene.center
                angle = float(np.arctan2(gy - oy, gx - ox) + rng.normal(0, 0.2))
                changed = replace(scene, gaps=scene.gaps + ((gx, gy, angle, float(rng.uniform(2.5, 5.0))),))
            clean, altered = scene.image(), changed.image()
            return np.where(np.abs(altered - clean).max(axis=2, keepdims=True) > 0, altered, image)
        inside = np.clip(-scene.outline() / 2.0, 0.0, 1.0)
        cx, cy = scene.point_inside(rng, s * 0.02)
        if name in ("Burnt", "Different Colour Spot"):
            radius = s * (rng.uniform(0.045, 0.09) if name == "Burnt" else rng.uniform(0.025, 0.055))
            blob = np.hypot(x - cx, y - cy) / radius + 0.3 * d.smooth_noise(rng, s, 20)
            alpha = (np.clip((1.0 - blob) * 2.0, 0, 1) * inside).astype(np.float32)
            if name == "Burnt":
                color = d.shade((0.32, 0.18, 0.08), 1.0 + 0.3 * d.texture("gravel", rng, s))
                return d.paint(image, alpha * 0.9, color)
            tint = [(0.25, 0.16, 0.10), (0.45, 0.42, 0.25), (0.55, 0.25, 0.15)][int(rng.integers(3))]
            return d.paint(image, alpha * 0.85, tint)
        if name == "Small Holes":
            out = image
            for _ in range(int(rng.integers(1, 4))):
                hx, hy = scene.point_inside(rng, s * 0.02)
                radius = s * rng.uniform(0.01, 0.02)
                dist = np.hypot(x - hx, y - hy)
                hole = d.coverage(dist - radius) * inside
                depth = np.clip(dist / radius, 0, 1)  # darker towards the centre
                out = d.paint(out, hole.astype(np.float32), (0.30, 0.20, 0.12), 0.35 + 0.65 * depth)
            return out
        # Small scratches: 1-3 short dark lines
        out = image
        for _ in range(int(rng.integers(1, 4))):
            pts = d.random_walk(rng, (cx, cy), rng.uniform(0, 2 * np.pi), int(rng.integers(3, 6)), s * 0.025, 0.3)
            alpha = d.pil_mask(
                s,
                lambda dr, k, p=pts: dr.line(d.scaled(p, k), fill=255, width=max(1, round(1.8 * k)), joint="curve"),
                4,
            )
            out = d.paint(out, (alpha * inside * 0.8).astype(np.float32), (0.45, 0.33, 0.2))
            cx, cy = scene.point_inside(rng, s * 0.02)
        return out
