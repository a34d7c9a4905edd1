"""What the service scores with: the loaded models, image decoding from bytes, and the one adapter
onto the library's scoring path (``score_images``), shared with ``spotdiff predict``.

``predict`` decodes a file with :func:`spotdiff.data.io.load_image` (PIL open, pixel limit, EXIF
orientation, :func:`~spotdiff.data.io.to_rgb`), converts it with
:func:`~spotdiff.data.transforms.image_to_tensor` at the model's size, scores a batch with
``Detector.predict`` (or :class:`~spotdiff.detect.export.OnnxDetector` for onnxruntime) and decides
with :func:`~spotdiff.detect.calibration.decide` on the calibrated threshold. The service does the
same steps on request bodies, so its scores equal ``predict``'s on the same image
(``tests/test_serve.py``). :func:`score_images` is the one place that calls the detector.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from spotdiff.data.io import to_rgb
from spotdiff.data.transforms import image_to_tensor
from spotdiff.detect.calibration import Calibration, decide, model_calibration
from spotdiff.detect.colour import ColourScale, colour_scale, render_overlay
from spotdiff.errors import ConfigError, DataError, WeightsError

BACKENDS = ("torch", "onnxruntime")


class Scorer(Protocol):
    """What the service needs of a detector: ``Detector`` and ``OnnxDetector`` both are one."""

    image_size_: tuple[int, int] | None
    forward_batch: int

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class ServedModel:
    """A loaded model and what every answer about it carries.

    Attributes:
        name: the URL name (``/v1/models/{name}/predict``).
        scorer: the detector (torch) or its onnxruntime runner.
        calibration: thresholds and normal scores (a served model must have them).
        fingerprint: SHA-256 of the fitted tensors, feature network and graph config
            (:func:`spotdiff.detect.export.model_fingerprint`).
        provenance: model type, arch, backbone weights record, training data source, image size.
        scale: the overlays' colour scale (the model's one scale, as in ``predict``).
    """

    name: str
    scorer: Scorer
    calibration: Calibration
    fingerprint: str
    provenance: dict[str, Any]
    backend: str
    scale: ColourScale
    image_size: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        assert self.scorer.image_size_ is not None
        self.image_size = (int(self.scorer.image_size_[0]), int(self.scorer.image_size_[1]))

    @property
    def thresholds(self) -> dict[str, float]:
        return {"image": self.calibration.image_threshold, "pixel": self.calibration.pixel_threshold}

    def describe(self) -> dict[str, Any]:
        """The JSON of ``GET /v1/models``."""
        return {"name": self.name, "backend": self.backend, "image_size": list(self.image_size),
                "thresholds": self.thresholds, "threshold_modes": {"image": self.calibration.image_mode,
                                                                  "pixel": self.calibration.pixel_mode},
                "model_fingerprint": self.fingerprint, "provenance": self.provenance}


def _provenance(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{model_dir}: cannot read config.json ({exc})") from exc
    return {"model": config.get("model"), "arch": config.get("arch"), "layers": config.get("layers"),
            "n_train": config.get("n_train"), "backbone_source": config.get("backbone_source"),
            "weights": config.get("weights"), "data_source": config.get("data_source") or {}}


def load_served_model(name: str, model_dir: str | os.PathLike[str], backend: str = "torch",
                      onnx_file: str | os.PathLike[str] | None = None,
                      device: str | torch.device = "cpu") -> ServedModel:
    """Load and validate one model directory (hashes verified); ``onnx_file`` for ``backend="onnxruntime"``
    (CPU), ``device`` for the torch backend.

    Raises:
        WeightsError / ConfigError: the directory or ONNX file fails validation, or the model has no
            calibration (a service must decide; fit with ``--val-good`` or ``--train``).
    """
    from spotdiff.detect import Detector
    from spotdiff.detect.export import OnnxDetector, model_fingerprint

    root = Path(model_dir)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    scorer: Any
    if backend == "onnxruntime":
        if onnx_file is None:
            raise ConfigError(f"{root}: --backend onnxruntime needs an ONNX file (written by `spotdiff export`)")
        scorer = OnnxDetector(root, onnx_file)
    else:
        if onnx_file is not None:
            raise ConfigError("--onnx is only used with --backend onnxruntime")
        scorer = Detector.load(root, device=device)
    calibration = model_calibration(scorer)
    if calibration is None:
        raise ConfigError(f"{root}: the model has no calibrated thresholds, so the service could not decide; "
                          "re-fit it with --train DIR or --val-good DIR")
    scale = colour_scale(scorer, calibration.image_threshold)
    assert scale is not None
    return ServedModel(name=name, scorer=scorer, calibration=calibration, fingerprint=model_fingerprint(root),
                       provenance=_provenance(root), backend=backend, scale=scale)


class ImageTooLarge(DataError):
    """The image has more pixels than the service accepts."""


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Request bytes -> 8-bit RGB PIL image, exactly as :func:`spotdiff.data.io.load_image` reads a file.

    Raises:
        DataError: empty, not an image, truncated or corrupt (the message says which).
        ImageTooLarge: more than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    if not data:
        raise DataError("empty body: no image bytes")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageTooLarge(f"image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels "
                                "(possible decompression bomb)")
        img.load()
        img = ImageOps.exif_transpose(img)
    except (DataError, ImageTooLarge):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"refused as a possible decompression bomb ({exc})") from exc
    except Image.UnidentifiedImageError:
        raise DataError("not an image: the body is in no image format PIL reads") from None
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise OSError, SyntaxError, ValueError, ...
        raise DataError(f"cannot read image ({type(exc).__name__}: {exc})") from None
    return to_rgb(img)


def prepare_image(data: bytes, size: tuple[int, int], max_pixels: int) -> tuple[torch.Tensor, str]:
    """Decode and resize request bytes: ``((3, H, W) float32 in [0, 1], SHA-256 hex of the bytes)``."""
    return image_to_tensor(decode_image(data, max_pixels), size), hashlib.sha256(data).hexdigest()


@dataclass
class Scored:
    """One image's outcome: ``score`` raw, ``normalized`` (fraction of normal validation images scoring
    lower), ``decision`` ``anomalous``/``normal``, ``anomaly_map`` ``(H, W)`` float32; ``error`` set
    (and no decision) when the model returned a non-finite score."""

    score: float
    normalized: float | None
    decision: str | None
    anomaly_map: np.ndarray | None
    error: str | None = None


def score_images(model: ServedModel, images: torch.Tensor) -> list[Scored]:
    """Score a batch ``(B, 3, H, W)`` at the model's size with the library's path: the detector's
    ``predict``, the calibration's normalised score and :func:`~spotdiff.detect.calibration.decide`.

    A non-finite score is never decided: that image gets ``error`` (fail closed). Exceptions of the
    detector propagate (the batcher turns them into a 500 for every image of the batch).
    """
    scores, maps = model.scorer.predict(images)
    values = scores.numpy().astype(np.float64)
    normalized = model.calibration.normalized(values)
    decisions = decide(values, model.calibration.image_threshold)
    maps_np = maps.numpy()
    out = []
    for i, value in enumerate(values.tolist()):
        if not math.isfinite(value) or not np.isfinite(maps_np[i]).all():
            out.append(Scored(value, None, None, None, error=f"the model returned a non-finite score ({value})"))
        else:
            out.append(Scored(value, float(normalized[i]), decisions[i], maps_np[i]))
    return out


def png_bytes(pixels: np.ndarray) -> bytes:
    """An ``(H, W, 3)`` or ``(H, W)`` uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def overlay_png(model: ServedModel, image: torch.Tensor, scored: Scored) -> bytes:
    """The annotated heat-map overlay of ``predict`` (same colour scale, title, colour bar, mask outline)."""
    assert scored.anomaly_map is not None
    pixels = (image.permute(1, 2, 0).numpy() * 255.0).round()
    binary = scored.anomaly_map > model.calibration.pixel_threshold
    return png_bytes(render_overlay(pixels, scored.anomaly_map, model.scale, scored.score,
                                    model.calibration.image_threshold, contour=binary))


def mask_png(model: ServedModel, scored: Scored) -> bytes:
    """The binary defect mask (map > pixel threshold) as a 0/255 PNG at the model's size, as ``predict --masks``."""
    assert scored.anomaly_map is not None
    return png_bytes((scored.anomaly_map > model.calibration.pixel_threshold).astype(np.uint8) * 255)
