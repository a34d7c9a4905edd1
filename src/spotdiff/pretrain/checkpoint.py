"""Pre-training checkpoints: one ``torch.save`` file of plain data, read with ``weights_only=True``.

A checkpoint holds only tensors, numbers, strings, None and lists/dicts of them, so
``torch.load(..., weights_only=True)`` reads it and a file carrying any other pickled object is
refused before anything in it runs. Keys:

    format, version      "spotdiff.pretrain.checkpoint", 1
    step, epoch          optimizer steps done; epoch of the next step (0-based)
    world_size           processes of the run that wrote it
    config               the resolved PretrainConfig as a dict
    model                the method's state_dict (backbone, heads, momentum encoder, queue, ...)
    backbone             the backbone's state_dict alone, torchvision keys (shares storage with model)
    optimizer, scaler    state_dicts (the lr schedule is a pure function of step)
    rng                  torch / cuda / numpy / python generator states, as tensors and lists
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spotdiff.errors import WeightsError
from spotdiff.files import torch_save_atomic
from spotdiff.models.backbones import load_failure

FORMAT = "spotdiff.pretrain.checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """Every global generator's state, as weights_only-loadable tensors and lists."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state` (CUDA ones when devices match)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus format/version) atomically: a crash never corrupts the old file."""
    path = Path(path)
    torch_save_atomic(path, {"format": FORMAT, "version": VERSION, **payload})  # OutputError if disk full
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint on the CPU without unpickling objects.

    Raises:
        WeightsError: missing file, a payload that is not plain data (refused by
            ``weights_only=True``), a corrupt file, or not a spotdiff pre-training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for unsafe payloads, RuntimeError for corrupt zips
        raise WeightsError(f"{path}: refused or unreadable checkpoint ({load_failure(exc)})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a spotdiff pre-training checkpoint")
    if ckpt.get("version") != VERSION:
        raise WeightsError(f"{path}: checkpoint version {ckpt.get('version')!r}, expected {VERSION}")
    return ckpt
