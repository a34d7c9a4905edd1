"""``pcb_synth``: a printed circuit board (VisA's "complex structure" domain).

One fixed board design (like VisA's pcb1-4, where every image shows the same product): green
solder mask with lighter copper traces ending in vias, a QFP and two SOIC chips with metal pins,
SMD resistors/capacitors on solder pads, an electrolytic capacitor, a pin header, mounting holes
and white silkscreen outlines. Normal images vary in board pose (shift, rotation, scale),
fixture texture, focus blur and (in the camera model) exposure, white balance and noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageDraw

from . import _draw as d
from ._base import Scene, SynthObject

# Board coordinates: u in [0, 1] (left to right), v in [0, BOARD_H] (top to bottom).
BOARD_H = 0.72
PIN_LEN, PIN_W = 0.032, 0.012
TRACE_W = 0.011
PAD_GROW = 1.3  # chip pads are this much longer (and wider) than the pins on them

SOLDER_MASK = (0.10, 0.38, 0.18)
TRACE = (0.22, 0.55, 0.27)
GOLD = (0.86, 0.70, 0.36)
TIN = (0.80, 0.80, 0.78)
CHIP = (0.09, 0.09, 0.10)
SILK = (0.92, 0.92, 0.86)
FIXTURE = (0.30, 0.30, 0.32)
COPPER = (0.93, 0.55, 0.30)


@dataclass(frozen=True)
class Rect:
    """An axis-aligned rectangle in board coordinates: centre (u, v), width w, height h."""

    u: float
    v: float
    w: float
    h: float

    def corners(self) -> np.ndarray:
        hw, hh = self.w / 2, self.h / 2
        return np.array(
            [
                [self.u - hw, self.v - hh],
                [self.u + hw, self.v - hh],
                [self.u + hw, self.v + hh],
                [self.u - hw, self.v + hh],
            ]
        )


@dataclass(frozen=True)
class Pin:
    """A chip pin: base point (u, v) on the chip edge, outward unit direction (du, dv), and a
    name like ``U1.t3`` (chip U1, top side, fourth pin)."""

    name: str
    u: float
    v: float
    du: float
    dv: float

    def polygon(self, bend: float = 0.0, grow: float = 1.0) -> np.ndarray:
        """The pin outline in board coordinates, rotated about its base by ``bend`` radians;
        ``grow`` > 1 gives the (larger) solder pad under the pin."""
        direction = d.rotate(np.array([[self.du, self.dv]]), bend)[0]
        normal = np.array([-direction[1], direction[0]])
        base = np.array([self.u, self.v]) - direction * PIN_LEN * (grow - 1.0) * 0.2
        tip = base + direction * PIN_LEN * grow
        half = normal * PIN_W * (1.0 + 2.0 * (grow - 1.0)) / 2
        return np.array([base - half, tip - half, tip + half, base + half])


@dataclass(frozen=True)
class Design:
    """The fixed board layout, in board coordinates."""

    chips: dict[str, Rect]
    pins: tuple[Pin, ...]
    passives: dict[str, Rect]  # SMD parts: body rectangle (pads are at its ends)
    passive_is_resistor: dict[str, bool]
    pads: tuple[Rect, ...]  # exposed solder pads (under passives and free ones)
    traces: tuple[np.ndarray, ...]  # (N, 2) polylines
    vias: tuple[tuple[float, float], ...]
    header: tuple[tuple[float, float], ...]
    holes: tuple[tuple[float, float], ...]
    cap: tuple[float, float, float]  # electrolytic capacitor centre u, v and radius


def _chip_pins(name: str, chip: Rect, per_side: int, sides: str) -> list[Pin]:
    pins: list[Pin] = []
    for side in sides:
        along = np.linspace(-0.36, 0.36, per_side)
        for k, t in enumerate(along):
            if side == "t":
                pins.append(Pin(f"{name}.t{k}", chip.u + t * chip.w, chip.v - chip.h / 2, 0.0, -1.0))
            elif side == "b":
                pins.append(Pin(f"{name}.b{k}", chip.u + t * chip.w, chip.v + chip.h / 2, 0.0, 1.0))
            elif side == "l":
                pins.append(Pin(f"{name}.l{k}", chip.u - chip.w / 2, chip.v + t * chip.h, -1.0, 0.0))
            else:
                pins.append(Pin(f"{name}.r{k}", chip.u + chip.w / 2, chip.v + t * chip.h, 1.0, 0.0))
    return pins


@lru_cache(maxsize=1)
def design() -> Design:
    """The fixed board layout (drawn once from a constant seed; it does not depend on ``seed``)."""
    rng = np.random.default_rng(2022)
    chips = {
        "U1": Rect(0.34, 0.34, 0.20, 0.20),
        "U2": Rect(0.74, 0.19, 0.20, 0.085),
        "U3": Rect(0.74, 0.46, 0.20, 0.085),
    }
    pins = (
        _chip_pins("U1", chips["U1"], 6, "tblr")
        + _chip_pins("U2", chips["U2"], 5, "tb")
        + _chip_pins("U3", chips["U3"], 5, "tb")
    )
    passives = {
        "R1": Rect(0.10, 0.22, 0.055, 0.028),
        "R2": Rect(0.10, 0.32, 0.055, 0.028),
        "C1": Rect(0.10, 0.42, 0.055, 0.028),
        "R3": Rect(0.56, 0.60, 0.028, 0.055),
        "C2": Rect(0.93, 0.32, 0.028, 0.055),
        "R4": Rect(0.34, 0.60, 0.055, 0.028),
    }
    is_resistor = {k: k.startswith("R") for k in passives}
    pads: list[Rect] = []
    for body in passives.values():
        if body.w > body.h:
            pads += [
                Rect(body.u - body.w / 2, body.v, 0.022, body.h * 1.15),
                Rect(body.u + body.w / 2, body.v, 0.022, body.h * 1.15),
            ]
        else:
            pads += [
                Rect(body.u, body.v - body.h / 2, body.w * 1.15, 0.022),
                Rect(body.u, body.v + body.h / 2, body.w * 1.15, 0.022),
            ]
    # Traces: from a pin tip straight out, then a 45-degree jog, then straight on, ending in a via.
    traces: list[np.ndarray] = []
    vias: list[tuple[float, float]] = []
    for pin in pins:
        if rng.random() < 0.35:
            continue
        start = np.array([pin.u + pin.du * PIN_LEN, pin.v + pin.dv * PIN_LEN])
        out = np.array([pin.du, pin.dv])
        side = np.array([-pin.dv, pin.du]) * rng.choice([-1.0, 1.0])
        p1 = start + out * rng.uniform(0.015, 0.05)
        p2 = p1 + (out + side) * rng.uniform(0.01, 0.04)
        p3 = p2 + out * rng.uniform(0.02, 0.07)
        line = np.stack([start, p1, p2, p3])
        if (
            line[:, 0].min() < 0.04
            or line[:, 0].max() > 0.96
            or line[:, 1].min() < 0.04
            or line[:, 1].max() > BOARD_H - 0.04
        ):
            continue
        traces.append(line)
        vias.append((float(p3[0]), float(p3[1])))
    # A few long bus traces across the free area below the chips.
    for k in range(4):
        v = 0.56 + 0.025 * k
        traces.append(np.array([[0.04, v], [0.22 + 0.02 * k, v], [0.26 + 0.02 * k, v + 0.05], [0.48, v + 0.05]]))
    header = tuple((0.62 + 0.055 * k, 0.64) for k in range(6))
    holes = ((0.035, 0.035), (0.965, 0.035), (0.035, BOARD_H - 0.035), (0.965, BOARD_H - 0.035))
    return Design(
        chips,
        tuple(pins),
        passives,
        is_resistor,
        tuple(pads),
        tuple(traces),
        tuple(vias),
        header,
        holes,
        (0.12, 0.58, 0.055),
    )


@dataclass(frozen=True)
class PcbScene(Scene):
    size: int
    center: tuple[float, float]
    angle: float
    px_per_unit: float
    fixture_seed: int
    blur_sigma: float
    board_tint: float
    missing: frozenset[str] = field(default_factory=frozenset)  # omitted components

    def to_image(self, pts: np.ndarray) -> np.ndarray:
        """Board coordinates (N, 2) -> image pixel coordinates (N, 2)."""
        local = (np.asarray(pts, dtype=np.float64) - [0.5, BOARD_H / 2]) * self.px_per_unit
        return d.rotate(local, self.angle) + self.center

    def board_layer(self) -> np.ndarray:
        """The board art warped into the image: (size, size, 4) premultiplied RGB + alpha; cached.

        The art is drawn once per board state (missing components) in the board's own frame at
        about twice the image resolution and then mapped by this scene's pose (bilinear).
        """
        return self.cached("_layer", self._warp_board)

    def _warp_board(self) -> np.ndarray:
        k = _art_px_per_unit(self.size)
        art = board_art(k, self.missing)
        scale = self.px_per_unit / k
        c, s = np.cos(self.angle) / scale, np.sin(self.angle) / scale
        # output pixel p -> art pixel: R^T (p - center) / scale + art centre of the board
        bu, bv = 0.5 * k + ART_MARGIN, BOARD_H / 2 * k + ART_MARGIN
        cx, cy = self.center
        coeffs = (c, s, bu - (c * cx + s * cy), -s, c, bv - (-s * cx + c * cy))
        channels = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(art[..., i]), mode="F").transform(
                    (self.size, self.size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
                )
            )
            for i in range(4)
        ]
        return np.stack(channels, axis=2).astype(np.float32)

    def board_mask(self) -> np.ndarray:
        """Anti-aliased coverage of the board, (size, size) in [0, 1]."""
        return self.board_layer()[..., 3]

    def render(self) -> np.ndarray:
        s = self.size
        rng = np.random.default_rng(self.fixture_seed)
        img = d.shade(FIXTURE, 1.0 + 0.06 * d.texture("grass", rng, s))
        layer = self.board_layer()
        alpha = layer[..., 3]
        # drop shadow of the board on the fixture
        img = d.paint(img, 0.45 * d.blur(np.roll(alpha, (3, 3), axis=(0, 1)), 2.0), (0.05, 0.05, 0.05))
        light = self.board_tint * (1.0 + 0.04 * d.texture("gravel", rng, s))
        img = img * (1.0 - alpha[..., None]) + layer[..., :3] * light[..., None]
        return np.clip(d.blur(img, self.blur_sigma), 0.0, 1.0).astype(np.float32)

    @property
    def design(self) -> Design:
        return design()


ART_MARGIN = 4  # pixels of empty border around the board art


def _art_px_per_unit(size: int) -> int:
    """Resolution of the board art: about twice the largest scale a scene maps it to (1.25 times
    above 512 px, to bound the memory of the cached art)."""
    return int(np.ceil((2.0 if size <= 512 else 1.25) * 0.92 * size))


@lru_cache(maxsize=12)  # the normal board + the 9 boards with one component missing + spare
def board_art(k: int, missing: frozenset[str] = frozenset()) -> np.ndarray:
    """The board drawn in its own frame at ``k`` pixels per board unit: (H, W, 4) float32,
    premultiplied RGB and alpha. ``missing`` names omitted components (chips, passives, ``C3``).
    Read-only (cached: one per board state)."""
    dz = design()
    width, height = int(np.ceil(k + 2 * ART_MARGIN)), int(np.ceil(BOARD_H * k + 2 * ART_MARGIN))
    rng = np.random.default_rng(7)
    grain = d.texture("gravel", rng, max(width, height))[:height, :width]

    def pts(board_pts: ArrayLike) -> list[tuple[float, float]]:
        return [(float(u * k + ART_MARGIN), float(v * k + ART_MARGIN)) for u, v in np.asarray(board_pts)]

    def mask(draw_fn) -> np.ndarray:
        canvas = Image.new("L", (width, height), 0)
        draw_fn(ImageDraw.Draw(canvas))
        return np.asarray(canvas, dtype=np.float32) / 255.0

    def circle(dr, u: float, v: float, r: float, outline: bool = False) -> None:
        (cx, cy), rad = pts([[u, v]])[0], r * k
        box = [cx - rad, cy - rad, cx + rad, cy + rad]
        if outline:
            dr.ellipse(box, outline=255, width=max(1, round(k / 250)))
        else:
            dr.ellipse(box, fill=255)

    board = mask(
        lambda dr: dr.rectangle([ART_MARGIN, ART_MARGIN, ART_MARGIN + k - 1, ART_MARGIN + BOARD_H * k - 1], fill=255)
    )
    img = np.zeros((height, width, 3), np.float32)
    img = d.paint(img, board, SOLDER_MASK, 1.0 + 0.05 * grain)

    def traces(dr):
        for line in dz.traces:
            dr.line(pts(line), fill=255, width=max(1, round(TRACE_W * k)), joint="curve")
        for u, v in dz.vias:
            circle(dr, u, v, 0.012)

    img = d.paint(img, mask(traces), TRACE, 1.0 + 0.04 * grain)

    def silk(dr):
        line_w = max(1, round(k / 250))
        for rect in dz.chips.values():
            pad = Rect(rect.u, rect.v, rect.w + 2.4 * PIN_LEN, rect.h + 2.4 * PIN_LEN)
            dr.line(pts(pad.corners()[[0, 1, 2, 3, 0]]), fill=255, width=line_w)
        for body in dz.passives.values():
            box = Rect(body.u, body.v, body.w + 0.035, body.h + 0.035)
            dr.line(pts(box.corners()[[0, 1, 2, 3, 0]]), fill=255, width=line_w)
        u, v, r = dz.cap
        circle(dr, u, v, r + 0.012, outline=True)
        for j in range(3):  # a "label" of small blocks
            dr.polygon(pts(Rect(0.46 + 0.03 * j, 0.685, 0.02, 0.018).corners()), fill=255)

    img = d.paint(img, 0.9 * mask(silk), SILK)

    def metal(dr):
        for pad in dz.pads:
            dr.polygon(pts(pad.corners()), fill=255)
        for pin in dz.pins:
            dr.polygon(pts(pin.polygon(grow=PAD_GROW)), fill=255)
        for u, v in dz.header:
            dr.polygon(pts(Rect(u, v, 0.04, 0.04).corners()), fill=255)
        for u, v in dz.holes:
            circle(dr, u, v, 0.028)

    img = d.paint(img, mask(metal), GOLD, 1.0 + 0.05 * grain)

    def drill(dr):
        for u, v in dz.header:
            circle(dr, u, v, 0.011)
        for u, v in dz.holes:
            circle(dr, u, v, 0.017)

    img = d.paint(img, mask(drill), (0.04, 0.04, 0.04))

    def pins(dr):
        for pin in dz.pins:
            if pin.name.split(".")[0] not in missing:
                dr.polygon(pts(pin.polygon()), fill=255)

    img = d.paint(img, mask(pins), TIN, 1.0 + 0.06 * grain)

    chips = [(name, rect) for name, rect in dz.chips.items() if name not in missing]
    img = d.paint(
        img, mask(lambda dr: [dr.polygon(pts(r.corners()), fill=255) for _, r in chips]), CHIP, 1.0 + 0.12 * grain
    )

    # pin-1 markers on the chips
    def pin_markers(dr: ImageDraw.ImageDraw) -> None:
        for _, r in chips:
            circle(dr, r.u - r.w * 0.32, r.v - r.h * 0.25, 0.009)

    img = d.paint(img, 0.5 * mask(pin_markers), (0.45, 0.45, 0.45))

    present = [(name, body) for name, body in dz.passives.items() if name not in missing]

    def smd(resistors: bool):
        def draw(dr):
            for name, body in present:
                if dz.passive_is_resistor[name] == resistors:
                    dr.polygon(pts(body.corners()), fill=255)

        return draw

    def end_caps(dr):  # tinned ends of the SMD parts
        for _, b in present:
            if b.w > b.h:
                caps = [Rect(b.u - b.w * 0.4, b.v, b.w * 0.2, b.h), Rect(b.u + b.w * 0.4, b.v, b.w * 0.2, b.h)]
            else:
                caps = [Rect(b.u, b.v - b.h * 0.4, b.w, b.h * 0.2), Rect(b.u, b.v + b.h * 0.4, b.w, b.h * 0.2)]
            for c in caps:
                dr.polygon(pts(c.corners()), fill=255)

    img = d.paint(img, mask(smd(True)), (0.12, 0.12, 0.12), 1.0 + 0.1 * grain)
    img = d.paint(img, mask(smd(False)), (0.72, 0.60, 0.42), 1.0 + 0.05 * grain)
    img = d.paint(img, mask(end_caps), TIN)

    if "C3" not in missing:  # electrolytic capacitor seen from the top: shaded can with a polarity band
        u, v, r = dz.cap
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        (cu, cv), rad = pts([[u, v]])[0], r * k
        dist = np.hypot(xx - cu, yy - cv) / rad
        can = d.coverage((dist - 1.0) * rad)
        img = d.paint(img, can, (0.72, 0.74, 0.78), 0.75 + 0.25 * np.clip(1.0 - dist, 0, 1) + 0.04 * grain)
        img = d.paint(img, can * d.coverage(np.abs(xx - cu + rad * 0.55) - rad * 0.18), (0.15, 0.16, 0.22))
    # img is premultiplied (painted over black inside the board); slight blur against aliasing
    art = np.concatenate([d.blur(img, 0.6), d.blur(board, 0.6)[..., None]], axis=2)
    art.setflags(write=False)
    return art


class PcbSynth(SynthObject):
    name = "pcb_synth"
    defect_names = ("Missing Component", "Scratch", "Burnt", "Bent Pin", "Missing Pin", "Solder Splash")

    def scene(self, rng: np.random.Generator, size: int) -> PcbScene:
        return PcbScene(
            size=size,
            center=(size / 2 + rng.normal(0, 0.015 * size), size / 2 + rng.normal(0, 0.015 * size)),
            angle=float(rng.normal(0, np.deg2rad(1.5))),
            px_per_unit=size * 0.88 * rng.uniform(0.97, 1.03),
            fixture_seed=int(rng.integers(2**31)),
            blur_sigma=float(rng.uniform(0.25, 0.7)),
            board_tint=float(rng.uniform(0.92, 1.08)),
        )

    def defect(self, scene: Scene, image: np.ndarray, defect_id: int, rng: np.random.Generator) -> np.ndarray:
        assert isinstance(scene, PcbScene)
        dz, s = scene.design, scene.size
        name = self.defect_names[defect_id - 1]
        if name == "Missing Component":
            # one of the larger parts (two SOICs, the capacitor) 60 % of the time, else a small passive
            part = str(rng.choice(["U2", "U3", "C3"] if rng.random() < 0.6 else list(dz.passives)))
            return _replace_changed(image, scene.image(), replace(scene, missing=scene.missing | {part}).image())
        if name in ("Bent Pin", "Missing Pin"):
            # the pin is removed, exposing its solder pad; a bent pin is redrawn rotated about its base
            pin = dz.pins[int(rng.integers(len(dz.pins)))]
            light = scene.board_tint * (1.0 + 0.05 * rng.standard_normal())
            out = d.paint(
                image, d.blur(_polygon_mask(scene, pin.polygon()), 0.4), GOLD, np.full((s, s), light, np.float32)
            )
            if name == "Bent Pin":
                bend = float(rng.choice([-1, 1]) * rng.uniform(0.5, 0.9))
                out = d.paint(out, d.blur(_polygon_mask(scene, pin.polygon(bend)), 0.4), TIN)
            return out
        # Painted defects: anywhere on the board, away from its edges.
        u, v = rng.uniform(0.08, 0.92), rng.uniform(0.08, BOARD_H - 0.08)
        cx, cy = scene.to_image(np.array([[u, v]]))[0]
        x, y = d.pixel_grid(s)
        if name == "Scratch":
            pts = d.random_walk(
                rng, (cx, cy), rng.uniform(0, 2 * np.pi), int(rng.integers(5, 10)), s * rng.uniform(0.03, 0.06), 0.3
            )
            width = rng.uniform(1.5, 3.0)
            alpha = d.pil_mask(
                s, lambda dr, k: dr.line(d.scaled(pts, k), fill=255, width=max(1, round(width * k)), joint="curve"), 4
            )
            color = COPPER if rng.random() < 0.7 else (0.85, 0.85, 0.8)
            return d.paint(image, d.blur(alpha, 0.3) * scene.board_mask(), color)
        if name == "Burnt":
            radius = s * rng.uniform(0.045, 0.1)
            blob = np.hypot((x - cx) / rng.uniform(0.7, 1.3), (y - cy) / rng.uniform(0.7, 1.3)) / radius
            blob = blob + 0.35 * d.smooth_noise(rng, s, 12)
            alpha = np.clip((1.0 - blob) * 2.5, 0, 1) ** 0.7
            char = d.shade((0.10, 0.06, 0.03), 1.0 + 0.4 * d.texture("gravel", rng, s))
            return d.paint(image, alpha.astype(np.float32) * scene.board_mask(), char)
        # Solder splash: 1-4 shiny tin droplets, each with a highlight, clustered together.
        out = image
        for _ in range(int(rng.integers(2, 6))):
            radius = s * rng.uniform(0.01, 0.028)
            dx, dy = cx + rng.normal(0, s * 0.02), cy + rng.normal(0, s * 0.02)
            dist = np.hypot(x - dx, y - dy) / radius
            drop = d.coverage((dist - 1.0) * radius) * scene.board_mask()
            glint = np.exp(-((x - dx + radius * 0.35) ** 2 + (y - dy + radius * 0.35) ** 2) / (0.1 * radius**2 + 0.3))
            out = d.paint(out, drop, TIN, 0.55 + 0.45 * np.sqrt(np.clip(1 - dist**2, 0, 1)) + 0.5 * glint)
        return out


def _polygon_mask(scene: PcbScene, board_pts: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (size, size) of a polygon given in board coordinates."""
    poly = [tuple(p) for p in scene.to_image(board_pts)]
    return d.pil_mask(scene.size, lambda dr, k: dr.polygon(d.scaled(poly, k), fill=255), 4)


def _replace_changed(image: np.ndarray, clean: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """``image`` with the pixels where ``changed`` differs from ``clean`` taken from ``changed``."""
    diff = np.abs(changed - clean).max(axis=2, keepdims=True) > 0
    return np.where(diff, changed, image)
