"""The fitted head of a detector as an ``nn.Module``: normalised images -> image scores and anomaly maps.

One head per detector (:class:`spotdiff.detect.padim_head.PaDiMHead`,
:class:`spotdiff.detect.patchcore_head.PatchCoreHead`) is what ``predict``, ``test``, ``serve`` and
``export`` all run: backbone features, the detector's feature assembly and distance, then the
map step shared here (bilinear upsampling and Gaussian smoothing as two matrix products, the same
operators as :func:`spotdiff.detect.features.upsample_and_smooth`).

A head is built in one of two modes, chosen explicitly by whoever builds it (``traceable``):

* eager (``predict``): the detector's own tensors on its device, the stem run one image at a time
  (:func:`spotdiff.models.extract_features`) and the detector's eager-only parts (faiss search,
  PaDiM's packed factors unpacked by blocks);
* traceable (``export``): a CPU copy of everything (the detector is left as it was), the stem
  batched (the same arithmetic per image) and only operations ``torch.export`` and ONNX can
  capture with a dynamic batch.

Everything else (feature assembly, the image score, the maps) is the same code in both modes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models import ResNet

from spotdiff.detect.features import GAUSSIAN_SIGMA, _axis_operator
from spotdiff.errors import DataError
from spotdiff.models import extract_features

_STAGES = ("layer1", "layer2", "layer3", "layer4")


def feature_grid(image_size: tuple[int, int], layer: str) -> tuple[int, int]:
    """``(h, w)`` of a ResNet stage's output for ``image_size`` inputs: the stem halves twice, each stage
    after ``layer1`` once more (every stride-2 step maps ``n`` to ``ceil(n / 2)``)."""
    halvings = 2 + _STAGES.index(layer)
    h, w = image_size
    for _ in range(halvings):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


class DetectorHead(nn.Module):
    """Shared part of the heads: backbone features and the map step.

    Args:
        backbone: the detector's inference backbone (eager) or a CPU copy of it (traceable).
        layers: stages used, shallow to deep; maps live on the grid of ``layers[0]``.
        image_size: ``(H, W)`` of the maps.
        traceable: see the module docstring.
        device: where the head's own buffers live (the fitted tensors' device).
    """

    map_rows: torch.Tensor  # (H, h) float32: upsampling then blur along rows
    map_cols: torch.Tensor  # (W, w) float32: the same along columns

    def __init__(
        self,
        backbone: ResNet,
        layers: Sequence[str],
        image_size: tuple[int, int],
        traceable: bool,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = list(layers)
        self.image_size = image_size
        self.traceable = traceable
        self.grid = feature_grid(image_size, self.layers[0])
        h, w = image_size
        self.register_buffer("map_rows", _axis_operator(self.grid[0], h, GAUSSIAN_SIGMA).to(device, torch.float32))
        self.register_buffer("map_cols", _axis_operator(self.grid[1], w, GAUSSIAN_SIGMA).to(device, torch.float32))

    def backbone_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{layer: (B, C, h, w)}`` of normalised ``(B, 3, H, W)`` images; DataError unless ``layers[0]``
        has the grid the head was built for."""
        if not self.traceable:
            feats = extract_features(self.backbone, images, self.layers)
        else:  # the stem batched: extract_features splits the batch, which a dynamic-batch graph cannot
            m = self.backbone
            x = m.maxpool(m.relu(m.bn1(m.conv1(images))))
            feats = {}
            for name in _STAGES[: _STAGES.index(self.layers[-1]) + 1]:
                x = getattr(m, name)(x)
                if name in self.layers:
                    feats[name] = x
        grid = tuple(feats[self.layers[0]].shape[-2:])
        if grid != self.grid:
            raise DataError(f"feature grid {grid} does not match the fitted model's {self.grid}")
        return feats

    def maps(self, grid_scores: torch.Tensor) -> torch.Tensor:
        """``(B, h, w)`` patch scores -> ``(B, H, W)`` maps: bilinear upsampling, Gaussian of sigma
        ``GAUSSIAN_SIGMA`` px (``A_H @ map @ A_W^T``, as :func:`~spotdiff.detect.features.upsample_and_smooth`)."""
        return self.map_rows @ grid_scores @ self.map_cols.T
