"""U-Net segmenter: a torchvision ResNet encoder and our own upsampling decoder.

Encoder features (strides relative to the input):
    stem (conv1-bn1-relu, /2), layer1 (/4), layer2 (/8), layer3 (/16), layer4 (/32).
Decoder: five blocks, each ``upsample x2 (bilinear, to the skip's size) -> concat skip ->
(conv3x3-BN-ReLU) x 2``, with skips layer3, layer2, layer1, stem and none (last block, back to
the input resolution), channels 256, 128, 64, 32, 16; a 3x3 conv gives one anomaly logit per
pixel. Pixel map = ``sigmoid(logit)`` (anomaly probability), image score = max of the map.
Loss: sigmoid focal loss (Lin et al. 2017), alpha = 0.25, gamma = 2, averaged over pixels.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import ResNet
from torchvision.ops import sigmoid_focal_loss

from spotdiff.models import layer_channels

DECODER_CHANNELS = (256, 128, 64, 32, 16)
STEM_CHANNELS = 64
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
# Initial foreground probability of the logit bias (RetinaNet's prior): starts every pixel at
# p = 0.01 so the first focal-loss steps are not dominated by the (many) normal pixels.
PRIOR_PROBABILITY = 0.01


class DecoderBlock(nn.Module):
    """Upsample to the skip's size (or x2), concatenate the skip, two conv3x3-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class UNet(nn.Module):
    """U-Net over a torchvision ResNet encoder (resnet18 / resnet50 / wide_resnet50_2).

    Args:
        encoder: a torchvision ResNet, e.g. from :func:`spotdiff.models.build_backbone`; its
            ``avgpool`` and ``fc`` are unused (and removed).
        arch: the encoder's architecture name, for the stage channel counts.
    """

    def __init__(self, encoder: ResNet, arch: str) -> None:
        super().__init__()
        encoder.fc = nn.Identity()
        encoder.avgpool = nn.Identity()
        self.encoder = encoder
        c1, c2, c3, c4 = layer_channels(arch, ("layer1", "layer2", "layer3", "layer4"))
        skips = (c3, c2, c1, STEM_CHANNELS, 0)
        in_channels = (c4,) + DECODER_CHANNELS[:-1]
        self.decoder = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(in_channels, skips, DECODER_CHANNELS))
        self.head = nn.Conv2d(DECODER_CHANNELS[-1], 1, 3, padding=1)
        assert self.head.bias is not None  # Conv2d(bias=True)
        nn.init.constant_(self.head.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(encoder parameters, new-layer parameters)``: the ResNet, and the decoder + head."""
        return list(self.encoder.parameters()), [*self.decoder.parameters(), *self.head.parameters()]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` ImageNet-normalised images -> ``(B, H, W)`` anomaly logits."""
        e = self.encoder
        stem = e.relu(e.bn1(e.conv1(images)))
        x1 = e.layer1(e.maxpool(stem))
        x2 = e.layer2(x1)
        x3 = e.layer3(x2)
        x = e.layer4(x3)
        for block, skip in zip(self.decoder, (x3, x2, x1, stem, None)):
            size = skip.shape[-2:] if skip is not None else images.shape[-2:]
            x = block(x, skip, tuple(size))
        return self.head(x).squeeze(1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Pixel-mean sigmoid focal loss of ``(B, H, W)`` logits against ``(B, H, W)`` masks in {0, 1}."""
        return sigmoid_focal_loss(
            logits, masks.to(logits.dtype), alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="mean"
        )

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``(B,)`` = max of the map, and pixel maps ``(B, H, W)``, probabilities in [0, 1]."""
        maps = torch.sigmoid(self(images))
        return maps.flatten(1).amax(dim=1), maps
