"""1-class anomaly detection: PaDiM and PatchCore fitted on normal images only.

>>> from spotdiff.detect import PaDiM, Detector
>>> model = PaDiM(arch="resnet18").fit(train_dataset)       # doctest: +SKIP
>>> scores, maps = model.predict(images)                     # doctest: +SKIP
>>> model.save("models/padim"); Detector.load("models/padim")  # doctest: +SKIP
>>> model, cal, _ = fit_folder(PaDiM(), "good/", image_size=256)  # plain folder + thresholds  # doctest: +SKIP
>>> model, cal, _ = fit_dataset(PaDiM(), train_dataset)  # a dataset split + thresholds  # doctest: +SKIP
"""

from spotdiff.detect.base import Detector
from spotdiff.detect.calibration import Calibration, calibrate
from spotdiff.detect.evaluate import evaluate_detector
from spotdiff.detect.fitting import fit_dataset, fit_folder
from spotdiff.detect.padim import PaDiM
from spotdiff.detect.patchcore import PatchCore

DETECTORS: dict[str, type[Detector]] = {"padim": PaDiM, "patchcore": PatchCore}

__all__ = [
    "DETECTORS",
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


def load_detector(model_dir, device="cpu") -> Detector:  # type: ignore[no-untyped-def]
    """Load whichever detector a model directory holds (hashes verified)."""
    return Detector.load(model_dir, device=device)
