"""What the service scores with: the loaded models, and the service's own steps around ``predict``'s
per-image path.

Everything between the request's bytes and the answer is the path of ``spotdiff predict``: the bytes
are read by :func:`spotdiff.data.io.load_image_bytes` (the steps of ``load_image``: header, pixel
limit, decoding, EXIF orientation, ``to_rgb``), then :class:`~spotdiff.detect.scoring.ImageScorer`
resizes (``decode_image``), scores a batch and decides (``score_batch``: fail closed, ``error`` for a
non-finite score or map); masks are :func:`~spotdiff.detect.scoring.binary_mask` and overlays
:func:`~spotdiff.detect.scoring.overlay_picture`, as ``predict`` writes them. What is the service's
own: its (lower, configurable) pixel limit, a bound on the overlay's size, a client's bytes never
raising anything but a ``DataError``, and a model that raises failing only its own image
(:func:`score_alone`) instead of ending the run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from spotdiff.data.io import ImageTooLarge, load_image_bytes
from spotdiff.detect.calibration import Calibration
from spotdiff.detect.colour import ColourScale, colour_scale
from spotdiff.detect.predict import PNG_COMPRESS_LEVEL
from spotdiff.detect.scoring import (
    ERROR,
    DecodedImage,
    ImageScorer,
    ScoredImage,
    binary_mask,
    display_size,
    overlay_picture,
)
from spotdiff.errors import ConfigError, DataError, WeightsError

BACKENDS = ("torch", "onnxruntime")
BODY = "request body"
"""How error messages name the image of a request."""
__all__ = ["BACKENDS", "ServedModel", "load_served_model", "mask_png", "overlay_png", "prepare_request", "score_alone"]


@dataclass
class ServedModel:
    """A loaded model and what every answer about it carries.

    Attributes:
        name: the URL name (``/v1/models/{name}/predict``).
        scorer: ``predict``'s per-image path over the detector (torch) or its onnxruntime runner
            (``scorer.model``), at the model's calibrated thresholds, keeping the original for overlays.
        fingerprint: SHA-256 of the fitted tensors, feature network and graph config
            (:func:`spotdiff.detect.export.model_fingerprint`).
        provenance: model type, arch, backbone weights record, training data source, image size.
        scale: the overlays' colour scale (:func:`~spotdiff.detect.colour.colour_scale`, as in ``predict``).
    """

    name: str
    scorer: ImageScorer
    fingerprint: str
    provenance: dict[str, Any]
    backend: str
    scale: ColourScale

    @property
    def calibration(self) -> Calibration:
        """Thresholds and normal scores (a served model has them: :func:`load_served_model`)."""
        assert self.scorer.calibration is not None
        return self.scorer.calibration

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` the model scores at."""
        return self.scorer.image_size

    @property
    def thresholds(self) -> dict[str, float | None]:
        return {"image": self.scorer.threshold, "pixel": self.scorer.pixel_threshold}

    def describe(self) -> dict[str, Any]:
        """The JSON of ``GET /v1/models``."""
        return {
            "name": self.name,
            "backend": self.backend,
            "image_size": list(self.image_size),
            "thresholds": self.thresholds,
            "threshold_modes": {"image": self.calibration.image_mode, "pixel": self.calibration.pixel_mode},
            "model_fingerprint": self.fingerprint,
            "provenance": self.provenance,
        }


def _provenance(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{model_dir}: cannot read config.json ({exc})") from exc
    return {
        "model": config.get("model"),
        "arch": config.get("arch"),
        "layers": config.get("layers"),
        "n_train": config.get("n_train"),
        "backbone_source": config.get("backbone_source"),
        "weights": config.get("weights"),
        "data_source": config.get("data_source") or {},
    }


def load_served_model(
    name: str,
    model_dir: str | os.PathLike[str],
    backend: str = "torch",
    onnx_file: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> ServedModel:
    """Load and validate one model directory (hashes verified); ``onnx_file`` for ``backend="onnxruntime"``
    (CPU), ``device`` for the torch backend.

    Raises:
        WeightsError / ConfigError: the directory or ONNX file fails validation, or the model has no
            calibration (a service must decide; fit with ``--val-good`` or ``--train``).
    """
    from spotdiff.detect import Detector
    from spotdiff.detect.onnx_runtime import OnnxDetector, model_fingerprint
    from spotdiff.threads import session_threads

    root = Path(model_dir)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    detector: Any
    if backend == "onnxruntime":
        if onnx_file is None:
            raise ConfigError(f"{root}: --backend onnxruntime needs an ONNX file (written by `spotdiff export`)")
        detector = OnnxDetector(root, onnx_file, threads=session_threads())
    else:
        if onnx_file is not None:
            raise ConfigError("--onnx is only used with --backend onnxruntime")
        detector = Detector.load(root, device=device)
    scorer = ImageScorer(detector, keep_display=True)
    if scorer.calibration is None or scorer.threshold is None:
        raise ConfigError(
            f"{root}: the model has no calibrated thresholds, so the service could not decide; "
            "re-fit it with --train DIR or --val-good DIR"
        )
    scale = colour_scale(detector, scorer.threshold)
    assert scale is not None
    return ServedModel(
        name=name,
        scorer=scorer,
        fingerprint=model_fingerprint(root),
        provenance=_provenance(root),
        backend=backend,
        scale=scale,
    )


def prepare_request(model: ServedModel, data: bytes, max_pixels: int) -> tuple[DecodedImage, str]:
    """Request bytes -> ``(the decoded item of ImageScorer.decode_image, SHA-256 hex of the bytes)``.

    Raises:
        ImageTooLarge: more than ``max_pixels`` pixels (from the header, before decoding), or an
            aspect ratio so extreme that the overlay's original (at ``display_size``) would have more.
        DataError: empty, not an image, truncated or corrupt (the message says which); whatever the
            decoder raises on a client's bytes is one.
    """
    try:
        image = load_image_bytes(data, BODY, max_pixels)
        h, w = display_size((image.height, image.width), model.image_size)
        if h * w > max_pixels:
            raise ImageTooLarge(
                f"{BODY}: image of {image.width}x{image.height} pixels would be shown at {w}x{h} "
                f"beside its heat map, beyond the limit of {max_pixels} pixels (extreme aspect ratio)"
            )
        item = model.scorer.decode_image(image, BODY)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a client's bytes may make a decoder raise anything: a 400
        raise DataError(f"{BODY}: cannot read image ({type(exc).__name__}: {exc})") from None
    return item, hashlib.sha256(data).hexdigest()


def score_alone(model: ServedModel, item: DecodedImage) -> ScoredImage:
    """:meth:`ImageScorer.score_batch` of one item; an exception of the model is that image's ``error``
    (the service fails the image the model fails on, and goes on)."""
    try:
        return model.scorer.score_batch([item])[0]
    except Exception as exc:  # noqa: BLE001
        return ScoredImage(
            item.path,
            None,
            ERROR,
            original_size=item.original_size,
            error=f"{item.path}: the model raised {type(exc).__name__}: {exc}",
        )


def png_bytes(pixels: np.ndarray) -> bytes:
    """An ``(H, W, 3)`` or ``(H, W)`` uint8 array as PNG bytes (``predict``'s compression level)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def overlay_png(model: ServedModel, result: ScoredImage) -> bytes:
    """The overlay ``predict`` writes for ``result`` (:func:`~spotdiff.detect.scoring.overlay_picture`), as PNG."""
    picture = overlay_picture(result, model.scale, model.scorer.threshold, model.scorer.pixel_threshold)
    assert picture is not None, "overlay of a failed result"
    return png_bytes(picture)


def mask_png(model: ServedModel, result: ScoredImage) -> bytes:
    """The defect mask ``predict --masks`` writes for ``result`` (:func:`~spotdiff.detect.scoring.binary_mask`:
    at the original image's size, empty on a normal image), as a 0/255 PNG."""
    mask = binary_mask(result, model.scorer.pixel_threshold)
    assert mask is not None, "mask of a failed result"
    return png_bytes(mask.astype(np.uint8) * 255)
