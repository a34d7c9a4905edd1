"""1-class anomaly detection: PaDiM and PatchCore fitted on normal images only.

>>> from spotdiff.detect import PaDiM, Detector
>>> model = PaDiM(arch="resnet18").fit(train_dataset)       # doctest: +SKIP
>>> scores, maps = model.predict(images)                     # doctest: +SKIP
>>> model.save("models/padim"); Detector.load("models/padim")  # doctest: +SKIP
>>> model, cal, _ = fit_folder(PaDiM(), "good/", image_size=256)  # plain folder + thresholds  # doctest: +SKIP
>>> model, cal, _ = fit_dataset(PaDiM(), train_dataset)  # a dataset split + thresholds  # doctest: +SKIP

The names below are imported on first use (PEP 562), so ``DETECTOR_NAMES`` (the keys of ``DETECTORS``,
e.g. the CLI's ``--model`` choices) costs no torch import: ``spotdiff --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from spotdiff.lazy import lazy_names

if TYPE_CHECKING:
    import torch

    from spotdiff.detect.base import Detector
    from spotdiff.detect.calibration import Calibration, calibrate
    from spotdiff.detect.evaluate import evaluate_detector
    from spotdiff.detect.fitting import fit_dataset, fit_folder
    from spotdiff.detect.padim import PaDiM
    from spotdiff.detect.patchcore import PatchCore

    DETECTORS: dict[str, type[Detector]]

# model_type -> "module:class"; DETECTORS maps the same names to the classes (a test keeps them equal)
_DETECTOR_CLASSES = {"padim": "spotdiff.detect.padim:PaDiM", "patchcore": "spotdiff.detect.patchcore:PatchCore"}
DETECTOR_NAMES: tuple[str, ...] = tuple(_DETECTOR_CLASSES)

_LAZY = {
    "Detector": "spotdiff.detect.base",
    "Calibration": "spotdiff.detect.calibration",
    "calibrate": "spotdiff.detect.calibration",
    "evaluate_detector": "spotdiff.detect.evaluate",
    "fit_dataset": "spotdiff.detect.fitting",
    "fit_folder": "spotdiff.detect.fitting",
    "PaDiM": "spotdiff.detect.padim",
    "PatchCore": "spotdiff.detect.patchcore",
}

__all__ = [
    "DETECTORS",
    "DETECTOR_NAMES",
    "Calibration",
    "Detector",
    "PaDiM",
    "PatchCore",
    "calibrate",
    "evaluate_detector",
    "fit_dataset",
    "fit_folder",
    "load_detector",
]


_lazy = lazy_names(__name__, _LAZY, globals())


def __getattr__(name: str) -> Any:
    if name == "DETECTORS":
        classes = {}
        for kind, target in _DETECTOR_CLASSES.items():
            module, cls = target.split(":")
            classes[kind] = getattr(importlib.import_module(module), cls)
        globals()["DETECTORS"] = classes
        return classes
    return _lazy(name)


def load_detector(model_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> Detector:
    """Load whichever detector a model directory holds (hashes verified)."""
    from spotdiff.detect.base import Detector

    return Detector.load(model_dir, device=device)
