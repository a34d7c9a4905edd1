"""Probe images: a fixed input on which a fitted model's outputs are recorded, so that another
runtime (an ONNX export under onnxruntime) can be checked against the model without torch.

The images are a pure function of the image size (an integer hash of the element index, identical
on every platform and library version); a model directory records the fitted model's scores and
maps on them (``probe.safetensors``, see :mod:`spotdiff.detect.store`). A runtime whose outputs
differ from the record by more than ``PROBE_RTOL`` does not compute what the model computes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

PROBE_IMAGES = 2
PROBE_RTOL = 1e-3
"""Largest difference of probe scores and maps between a runtime and the record, relative to the
largest recorded value (our choice: 10x the 1e-4 parity measured in tests/test_onnx_export.py)."""


def probe_images(image_size: tuple[int, int]) -> np.ndarray:
    """``(PROBE_IMAGES, 3, H, W)`` float32 noise in [0, 1): a 32-bit integer hash of each element's index."""
    h, w = image_size
    x = np.arange(PROBE_IMAGES * 3 * h * w, dtype=np.uint64)
    mask = np.uint64(0xFFFFFFFF)
    x = (x * np.uint64(2654435761) + np.uint64(0x9E3779B9)) & mask
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x45D9F3B)) & mask
    x ^= x >> np.uint64(16)
    return (x.astype(np.float64) / 2.0**32).astype(np.float32).reshape(PROBE_IMAGES, 3, h, w)


def probe_record(scores: np.ndarray, maps: np.ndarray) -> dict[str, np.ndarray]:
    """What a model directory stores: image scores ``(PROBE_IMAGES,)`` and maps ``(PROBE_IMAGES, H, W)``, float32."""
    return {"scores": np.asarray(scores, np.float32), "maps": np.asarray(maps, np.float32)}


def probe_mismatch(scores: np.ndarray, maps: np.ndarray, record: Mapping[str, np.ndarray]) -> str | None:
    """None when ``scores``/``maps`` match ``record`` within ``PROBE_RTOL``; else which output differs."""
    for name, got in (("scores", np.asarray(scores)), ("maps", np.asarray(maps))):
        want = np.asarray(record[name], np.float64)
        if not np.isfinite(want).all():
            return f"the recorded {name} are not finite (a damaged record)"
        scale = float(np.abs(want).max(initial=0.0)) or 1.0
        if got.shape != want.shape:
            return f"its {name} have shape {got.shape}, the record {want.shape}"
        if not bool(np.all(np.abs(got - want) <= PROBE_RTOL * scale)):  # NaN fails too
            return f"its {name} on {PROBE_IMAGES} probe images differ by more than {PROBE_RTOL:g} relative"
    return None
