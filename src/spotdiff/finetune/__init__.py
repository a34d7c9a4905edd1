"""2-class fine-tuning: binary classifier and U-Net segmenter, high-shot and k-shot protocols.

See docs/finetune.md. Main entry points: :func:`run_finetune` (driver behind
``spotdiff finetune``) and :func:`aggregate` (mean ± sample std over seeds).
"""

from spotdiff.finetune.classifier import BinaryClassifier
from spotdiff.finetune.protocols import PROTOCOLS, Protocol, aggregate, get_protocol, open_protocol
from spotdiff.finetune.train import FinetuneConfig, build_model, predict, run_finetune, train_model
from spotdiff.finetune.unet import UNet

__all__ = [
    "PROTOCOLS",
    "BinaryClassifier",
    "FinetuneConfig",
    "Protocol",
    "UNet",
    "aggregate",
    "build_model",
    "get_protocol",
    "open_protocol",
    "predict",
    "run_finetune",
    "train_model",
]
