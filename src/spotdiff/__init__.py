"""spotdiff: industrial visual anomaly detection with SPot-the-Difference (SPD) pre-training.

Subpackages:
    data      VisA / MVTec-AD / synthetic datasets, splits, image I/O, `prepare`.
    augment   SmoothBlend and the weak global augmentation.
    pretrain  SimSiam, MoCo v2, SimCLR, supervised; SPD regulariser; training loop.
    detect    1-class detectors (PaDiM, PatchCore) with an estimator API.
    finetune  2-class classifier and U-Net segmenter, high-shot and k-shot protocols.
    models    torchvision backbones and weight loading shared by all of the above.
    metrics   exact AU-ROC / AU-PR / AP / AU-PRO under the VisA protocol.
    report    tables, plots and the HTML report.
"""

from spotdiff.errors import SpotdiffError

__version__ = "0.1.0"
__all__ = ["SpotdiffError", "__version__"]
