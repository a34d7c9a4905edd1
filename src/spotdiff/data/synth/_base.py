"""The object interface and the per-sample renderer shared by every synthetic object.

A sample is drawn in three independent random streams derived from
``(seed, object, normal/anomalous, index)``: the scene (pose, lighting of the part, textures),
the defects, and the camera (exposure, white balance, noise). A defect returns a full image;
the pixels where it differs from the image before it by more than ``CHANGE_THRESHOLD`` and
still differs after the camera model (not clipped to the same 8-bit value) are taken from it
and labelled with its class id; all other pixels are kept bit for bit. Hence the mask is
exactly the set of pixels the defects changed: rendering the same sample without its defects
gives an image that differs from it exactly on the mask (before JPEG compression).
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ._draw import Camera, bbox

# A defect must change a pixel by more than this (max over RGB, in [0, 1] units, about 8 grey
# levels) for the pixel to be changed and masked; weaker fringes are dropped.
CHANGE_THRESHOLD = 0.03
# Smallest accepted defect, in pixels at 256 x 256 (scaled with the image area).
MIN_DEFECT_PIXELS = 12
_STREAM_SCENE, _STREAM_DEFECT, _STREAM_CAMERA = 0, 1, 2


class Scene(ABC):
    """One defect-free instance of an object (its pose and appearance parameters)."""

    size: int

    @abstractmethod
    def render(self) -> np.ndarray:
        """The defect-free image, float32 (size, size, 3) in [0, 1]."""

    def image(self) -> np.ndarray:
        """``render()``, computed once per scene (scenes are immutable); read-only."""
        return self.cached("_image", self.render)

    def cached(self, key: str, compute):
        """``compute()`` memoised on this (frozen) instance under ``key``."""
        if key not in self.__dict__:
            value = compute()
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
            object.__setattr__(self, key, value)
        return self.__dict__[key]


class SynthObject(ABC):
    """A synthetic object category: how to draw normal instances and each defect type."""

    name: str
    # Defect class names; the class id of ``defect_names[i]`` is ``i + 1`` (0 is background).
    defect_names: tuple[str, ...]

    @abstractmethod
    def scene(self, rng: np.random.Generator, size: int) -> Scene:
        """Draw the parameters of one normal instance."""

    @abstractmethod
    def defect(self, scene: Scene, image: np.ndarray, defect_id: int, rng: np.random.Generator) -> np.ndarray:
        """Return ``image`` (the scene with earlier defects) with one more defect of ``defect_id``.

        Only pixels that should change may differ (by more than ``CHANGE_THRESHOLD``); the caller
        keeps every other pixel of ``image``.
        """


@dataclass(frozen=True)
class RenderedSample:
    """A rendered sample: ``image`` uint8 (H, W, 3), ``mask`` uint8 (H, W) class ids, and the
    ids of the defects it contains (empty for a normal sample)."""

    image: np.ndarray
    mask: np.ndarray
    defect_ids: tuple[int, ...]


def _stream(seed: int, name: str, anomalous: bool, index: int, stream: int) -> np.random.Generator:
    # crc32 (not hash()) so that the stream does not depend on PYTHONHASHSEED
    return np.random.default_rng([seed, zlib.crc32(name.encode()), int(anomalous), index, stream])


def defect_plan(obj: SynthObject, rng: np.random.Generator, index: int) -> list[int]:
    """Defect ids of the ``index``-th anomalous sample: the first cycles through every type (so all
    classes are equally frequent), a second one is added with p=0.25 and a third with p=0.08."""
    n = len(obj.defect_names)
    ids = [1 + index % n]
    for p in (0.25, 0.08):
        if rng.random() < p:
            ids.append(int(rng.integers(1, n + 1)))
    return ids


def render_sample(
    obj: SynthObject, seed: int, index: int, anomalous: bool, size: int, with_defects: bool = True
) -> RenderedSample:
    """Render normal or anomalous sample ``index`` of ``obj``; deterministic in all arguments.

    ``with_defects=False`` renders an anomalous sample's scene without its defects (same pose,
    lighting and noise), which is how tests check that defects change only masked pixels.
    """
    scene = obj.scene(_stream(seed, obj.name, anomalous, index, _STREAM_SCENE), size)
    camera = Camera(_stream(seed, obj.name, anomalous, index, _STREAM_CAMERA), size, size)
    image = scene.image()
    captured = camera.capture(image)
    mask = np.zeros((size, size), dtype=np.uint8)
    if anomalous and with_defects:
        rng = _stream(seed, obj.name, anomalous, index, _STREAM_DEFECT)
        min_pixels = max(4, round(MIN_DEFECT_PIXELS * (size / 256) ** 2))
        for defect_id in defect_plan(obj, rng, index):
            # redraw a defect that came out too small (e.g. clipped by the object's outline);
            # keep the largest attempt, which at tiny image sizes may be below min_pixels
            best, best_count = None, 0
            for _attempt in range(20):
                candidate = obj.defect(scene, image, defect_id, rng)
                # changed: a visible change of the scene that survives the camera (not clipped)
                changed = np.abs(candidate - image).max(axis=2) > CHANGE_THRESHOLD
                box = bbox(changed)
                if box is not None:
                    candidate_captured = camera.capture(candidate[box], box)
                    changed[box] &= np.any(candidate_captured != captured[box], axis=2)
                count = int(np.count_nonzero(changed))
                if count > best_count:
                    best, best_count = (candidate, candidate_captured, box, changed), count
                if count >= min_pixels:
                    break
            if best is None:  # pragma: no cover - a generator bug, not a user error
                raise RuntimeError(f"{obj.name}: defect {defect_id} produced no visible change")
            candidate, candidate_captured, box, changed = best
            inside = changed[box][..., None]
            image = image.copy()
            image[box] = np.where(inside, candidate[box], image[box])
            captured = captured.copy()
            captured[box] = np.where(inside, candidate_captured, captured[box])
            mask[changed] = defect_id
    ids = tuple(int(i) for i in np.unique(mask) if i) if anomalous and with_defects else ()
    return RenderedSample(image=captured, mask=mask, defect_ids=ids)
