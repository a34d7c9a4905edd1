"""Patch features and anomaly-map post-processing shared by PaDiM and PatchCore.

Shapes: ``B`` images, ``C`` channels, ``h x w`` feature grid, ``H x W`` input size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.models import ResNet

from spotdiff.errors import ConfigError
from spotdiff.models import extract_features, layer_channels

GAUSSIAN_SIGMA = 4.0
"""Standard deviation (in input pixels) of the Gaussian that smooths every anomaly map."""


def padim_channel_groups(
    arch: str, layers: Sequence[str], channel_index: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """``[(layer, channels)]``: the channels of ``channel_index`` (numbered through the concatenation of
    ``layers``) that each layer holds, as int64 indices into that layer; layers holding none are left out."""
    groups = []
    offset = 0
    for name, channels in zip(layers, layer_channels(arch, layers), strict=True):
        inside = channel_index[(channel_index >= offset) & (channel_index < offset + channels)] - offset
        offset += channels
        if inside.numel():
            groups.append((name, inside))
    return groups


def assemble_padim(
    feats: dict[str, torch.Tensor], groups: Sequence[tuple[str, torch.Tensor]], size: tuple[int, int] | torch.Size
) -> torch.Tensor:
    """``(B, d, h, w)``: the channels ``groups`` (:func:`padim_channel_groups`) of ``feats``, each layer's
    part upsampled to ``size`` by nearest-neighbour interpolation, concatenated."""
    parts = []
    for name, inside in groups:
        part = feats[name].index_select(1, inside.to(feats[name].device))
        if part.shape[-2:] != size:
            part = F.interpolate(part, size=size, mode="nearest")
        parts.append(part)
    return torch.cat(parts, dim=1)


def padim_embedding(
    backbone: ResNet, images: torch.Tensor, layers: Sequence[str], channel_index: torch.Tensor, arch: str
) -> torch.Tensor:
    """PaDiM patch embedding: the selected channels of ``layers``, each upsampled to the first layer's grid.

    Channels are numbered through the concatenation of ``layers`` in order; only the channels in
    ``channel_index`` (sorted, int64) are kept, *before* upsampling, so no full-width embedding is
    ever materialised. Deeper layers are upsampled with nearest-neighbour interpolation (each
    deep cell is copied onto the finer cells it covers, as in the PaDiM paper).

    Args:
        images: ``(B, 3, H, W)`` ImageNet-normalised.
    Returns:
        ``(B, d, h, w)`` float32, ``d = len(channel_index)``, ``(h, w)`` the grid of ``layers[0]``.
    """
    feats = extract_features(backbone, images, layers)
    return assemble_padim(feats, padim_channel_groups(arch, layers, channel_index), feats[layers[0]].shape[-2:])


def assemble_patchcore(feats: dict[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """``(B, C, h, w)``: each of ``layers`` 3x3 average-pooled (stride 1, zero padding not counted),
    bilinearly upsampled to the grid of ``layers[0]``, concatenated along channels."""
    size = feats[layers[0]].shape[-2:]
    parts = []
    for name in layers:
        part = F.avg_pool2d(feats[name], kernel_size=3, stride=1, padding=1, count_include_pad=False)
        if part.shape[-2:] != size:
            part = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
        parts.append(part)
    return torch.cat(parts, dim=1)


def pool_channels(patches: torch.Tensor, target_dim: int) -> torch.Tensor:
    """``(N, C) -> (N, target_dim)``: 1-D adaptive average pooling of each row (PatchCore's reduction)."""
    return F.adaptive_avg_pool1d(patches[:, None], target_dim)[:, 0]


def patchcore_embedding(
    backbone: ResNet, images: torch.Tensor, layers: Sequence[str], target_dim: int | None = None
) -> torch.Tensor:
    """PatchCore locally aware patch features.

    Each layer is 3x3 average-pooled (stride 1, padding 1, zero padding not counted) so a patch
    feature summarises its neighbourhood; deeper layers are bilinearly upsampled to the first
    layer's grid and all are concatenated along channels (:func:`assemble_patchcore`). With
    ``target_dim`` the concatenated vector of every patch is reduced to ``target_dim`` values by
    1-D adaptive average pooling over channels (:func:`pool_channels`, as in the PatchCore
    reference code); None keeps all channels.

    Returns:
        ``(B, C, h, w)`` float32.
    """
    emb = assemble_patchcore(extract_features(backbone, images, layers), layers)
    if target_dim is not None and target_dim != emb.shape[1]:
        b, c, h, w = emb.shape
        flat = pool_channels(emb.permute(0, 2, 3, 1).reshape(b * h * w, c), target_dim)
        emb = flat.reshape(b, h, w, target_dim).permute(0, 3, 1, 2)
    return emb


def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of standard deviation ``sigma`` truncated at 4 sigma (odd length)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """``(n, n)`` float64 matrix of the 1-D Gaussian blur of a length-``n`` signal.

    Borders are reflected (``d c b | a b c d``, scipy's ``mirror``); where the kernel radius
    exceeds ``n - 1`` the rest is replicated. Built by blurring the columns of the identity.
    """
    if sigma <= 0:
        return torch.eye(n, dtype=torch.float64)
    k = gaussian_kernel1d(sigma, torch.float64)
    r = k.numel() // 2
    x = torch.eye(n, dtype=torch.float64)[:, None, :]  # n unit signals
    pad = min(r, n - 1)
    x = F.pad(x, (pad, pad), mode="reflect")
    x = F.pad(x, (r - pad, r - pad), mode="replicate")
    return F.conv1d(x, k.view(1, 1, -1))[:, 0].T.contiguous()


@functools.lru_cache(maxsize=16)
def _axis_operator(n_in: int, n_out: int, sigma: float) -> torch.Tensor:
    """``(n_out, n_in)`` float64: linear upsampling (``align_corners=False``) then Gaussian blur, on one axis."""
    up = torch.eye(n_in, dtype=torch.float64)
    if n_out != n_in:
        up = F.interpolate(up[:, None, :], size=n_out, mode="linear", align_corners=False)[:, 0].T
    return _blur_matrix(n_out, sigma) @ up


def _separable(maps: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    rows = _axis_operator(maps.shape[-2], size[0], sigma).to(maps.device, maps.dtype)
    cols = _axis_operator(maps.shape[-1], size[1], sigma).to(maps.device, maps.dtype)
    return rows @ maps @ cols.T


def upsample_and_smooth(grid_maps: torch.Tensor, size: tuple[int, int], sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """``(B, h, w)`` patch scores -> ``(B, H, W)`` anomaly maps: bilinear upsampling, then Gaussian ``sigma``.

    Both steps are linear and separable, so they run as two small matrix products per map,
    ``A_H @ map @ A_W^T``, with no padded or upsampled intermediate.
    """
    return _separable(grid_maps, size, sigma)


def check_layers(layers: Sequence[str]) -> list[str]:
    """Validate layer names (``layer1`` .. ``layer4``, shallow to deep, no repeats)."""
    order = ["layer1", "layer2", "layer3", "layer4"]
    layers = list(layers)
    if not layers:
        raise ConfigError("at least one backbone layer is needed")
    bad = [name for name in layers if name not in order]
    if bad:
        raise ConfigError(f"unknown layer(s) {bad}; choose from {order}")
    if sorted(layers, key=order.index) != layers or len(set(layers)) != len(layers):
        raise ConfigError(f"layers must be distinct and ordered shallow to deep, got {layers}")
    return layers
