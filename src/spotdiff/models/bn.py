"""Re-estimate a backbone's BatchNorm running statistics on clean images (BN re-estimation).

Detectors (PaDiM, PatchCore) read a backbone in eval mode, so every BatchNorm layer normalises with
its stored ``running_mean`` / ``running_var``: whatever the last training passes left there (or
ImageNet's statistics) is part of every result. :func:`recalibrate_batchnorm` replaces them with
the exact average over a set of images -- momentum None, i.e. PyTorch's cumulative moving average,
so every batch weighs by its count of forward passes; with equal batches this is the mean of the
per-batch statistics -- leaving every weight untouched. :func:`recalibrate_batchnorm_folder` does
it for a folder of images decoded exactly as a detector decodes them (``AnomalyDataset`` at the
given size, ImageNet normalisation) and returns a record for the weights' metadata
(:func:`metadata_entries`).

Use: adapting an ImageNet backbone's BN to a production line's images, or putting every
pre-trained arm of an experiment on the same footing (``benchmarks/spd_effect.py``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from spotdiff.data.dataset import AnomalyDataset, ImageRecord
from spotdiff.data.listing import list_images
from spotdiff.data.transforms import normalize
from spotdiff.errors import DataError
from spotdiff.models.backbones import LoadedWeights, build_backbone

BN_BATCH = 16
"""Images per forward pass while re-estimating (our choice; the cumulative average does not depend
on it except through the per-batch variance's batch-size correction)."""


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model`` that tracks running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Reset and re-estimate every BN layer's running statistics over ``batches``; return the image count.

    ``batches``: ``(B, 3, H, W)`` float tensors already normalised as the model expects. Each BN
    layer's statistics become the cumulative average (momentum None) over all batches; weights,
    biases and every other buffer are unchanged; the model is left in eval mode, momenta restored.
    Raises DataError when ``batches`` is empty (the statistics would be left reset).
    """
    layers = batchnorm_layers(model)
    momenta = [m.momentum for m in layers]
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    count = 0
    try:
        model.eval()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
            layer.train()
        for images in batches:
            model(images.to(device))
            count += int(images.shape[0])
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
        model.eval()
    if count == 0:
        raise DataError("BN re-estimation: no images given")
    return count


def recalibrate_batchnorm_folder(
    model: nn.Module, folder: str | os.PathLike[str], image_size: int, batch_size: int = BN_BATCH
) -> dict[str, Any]:
    """:func:`recalibrate_batchnorm` on every image of ``folder`` (recursively) at ``image_size`` px.

    Every image is decoded and checked BEFORE the model is touched: a folder without images, or
    with an image that cannot be read, raises DataError naming it and leaves ``model`` as it was.
    Returns the record ``{folder, images, image_size, files_sha256}`` (``files_sha256``: hash of the
    sorted file names and sizes, identifying the image set).
    """
    if image_size < 1:
        raise DataError(f"BN re-estimation image size must be >= 1, got {image_size}")
    paths = list_images(folder, recursive=True)  # DataError when the folder has no image
    dataset = AnomalyDataset([ImageRecord(p, 0) for p in paths], image_size=image_size, name="bn images")
    images: list[torch.Tensor] = []
    for i in range(len(dataset)):
        try:
            images.append(dataset[i]["image"])
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{paths[i]}: cannot read image for BN re-estimation ({exc})") from exc
    stacked = torch.stack(images)
    count = recalibrate_batchnorm(
        model, (normalize(stacked[i : i + batch_size]) for i in range(0, len(stacked), batch_size))
    )
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path.name}\0{path.stat().st_size}\n".encode())
    return {"folder": str(folder), "images": count, "image_size": int(image_size), "files_sha256": digest.hexdigest()}


def metadata_entries(record: dict[str, Any]) -> dict[str, str]:
    """The record of :func:`recalibrate_batchnorm_folder` as safetensors string metadata (``bn_*`` keys)."""
    return {"bn_recalibrated": "true", **{f"bn_{key}": str(value) for key, value in record.items()}}


def recalibrated_weights(
    weights: LoadedWeights, folder: str | os.PathLike[str], image_size: int, seed: int = 0
) -> LoadedWeights:
    """``weights`` (random init drawn from ``seed``, as the detectors draw it) with BN re-estimated on ``folder``.

    The result is a :class:`LoadedWeights` holding the new state; its ``name`` records the
    re-estimation (folder, image count, size) so that model directories keep the provenance.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_backbone(weights.arch, weights)
    record = recalibrate_batchnorm_folder(net, folder, image_size)
    name = (
        f"{weights.name} + BN re-estimated on {record['images']} images of {record['folder']} "
        f"at {record['image_size']} px"
    )
    return LoadedWeights(
        weights.arch,
        name=name,
        file=weights.file,
        sha256=weights.sha256,
        state={k: v.detach().clone() for k, v in net.state_dict().items()},
    )
