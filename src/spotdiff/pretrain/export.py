"""Export a pre-trained backbone as torchvision-compatible safetensors.

The file holds the ResNet ``state_dict`` under torchvision's key names, without ``fc.*`` (the
pre-training head is not a classifier), plus string metadata: ``format``, ``arch``, ``method``,
``spd``, ``eta``, ``step``. Load it with ``spotdiff.models.build_backbone(arch, weights=file)``
or ``torchvision.models.<arch>().load_state_dict(safetensors.torch.load_file(file), strict=False)``
(the only missing keys are ``fc.weight`` and ``fc.bias``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from spotdiff.errors import WeightsError
from spotdiff.files import save_safetensors_atomic
from spotdiff.models import build_backbone, load_backbone_weights
from spotdiff.models.bn import metadata_entries, recalibrate_batchnorm_folder
from spotdiff.pretrain.checkpoint import load_checkpoint

BACKBONE_FORMAT = "spotdiff.backbone"


def write_backbone(
    state: Mapping[str, torch.Tensor], arch: str, out: str | os.PathLike[str], metadata: Mapping[str, Any]
) -> Path:
    """Check ``state`` fits a torchvision ``arch`` (fc excepted) and write it as safetensors atomically."""
    body = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    load_backbone_weights(build_backbone(arch), body, source="backbone state")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in body.items()}
    meta = {"format": BACKBONE_FORMAT, "arch": arch, **{k: str(v) for k, v in metadata.items()}}
    out = Path(out)
    save_safetensors_atomic(out, tensors, metadata=meta)  # OutputError if disk full
    return out


def export_backbone(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    arch: str | None = None,
    bn_recalibrate: str | os.PathLike[str] | None = None,
    bn_image_size: int = 256,
) -> Path:
    """Write the backbone of pre-training checkpoint ``ckpt`` to ``out`` (``.safetensors``).

    Args:
        arch: expected architecture; a WeightsError if the checkpoint's differs. None: the checkpoint's.
        bn_recalibrate: a folder of clean images: every BN layer's running statistics are re-estimated
            on them (``spotdiff.models.bn``, at ``bn_image_size`` px, detector preprocessing) before
            writing, and the metadata records it (``bn_*`` keys). A folder without a readable image:
            DataError, nothing written.
    """
    if Path(out).suffix != ".safetensors":
        raise WeightsError(f"{out}: the exported backbone must be a .safetensors file")
    payload = load_checkpoint(ckpt)
    config = payload.get("config", {})
    saved_arch = config.get("arch")
    if arch is not None and saved_arch is not None and arch != saved_arch:
        raise WeightsError(f"{ckpt}: checkpoint backbone is {saved_arch}, not {arch}")
    arch = arch or saved_arch
    if arch is None:
        raise WeightsError(f"{ckpt}: checkpoint does not name its architecture; pass --arch")
    metadata = {k: config.get(k) for k in ("method", "spd", "eta")} | {"step": payload.get("step")}
    if not isinstance(payload.get("backbone"), Mapping):
        raise WeightsError(f"{ckpt}: checkpoint holds no backbone state")
    state = payload["backbone"]
    if bn_recalibrate is not None:
        net = build_backbone(arch)
        load_backbone_weights(
            net, {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}, source=str(ckpt)
        )
        metadata |= metadata_entries(recalibrate_batchnorm_folder(net, bn_recalibrate, bn_image_size))
        state = net.state_dict()
    try:
        return write_backbone(state, arch, out, metadata)
    except WeightsError as exc:
        raise WeightsError(f"{ckpt}: {exc}") from exc
