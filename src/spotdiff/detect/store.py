"""Model directories: safetensors + JSON, hashed by a manifest, written atomically.

Layout of a model directory (format version 2)::

    config.json           model type, backbone arch, layers, image size, hyper-parameters
    model.safetensors     the fitted statistics (PaDiM: mean, packed inverse Cholesky factors, channel index;
                          PatchCore: memory bank)
    backbone.safetensors  the feature network's state_dict (the backbone with BatchNorm folded into
                          the convolutions, stages after the deepest used layer dropped), so the
                          directory is self-contained
    probe.safetensors     optional: the fitted model's scores and maps on seeded probe images
                          (:mod:`spotdiff.detect.probe`), against which an ONNX export is checked
                          without torch
    manifest.json         {"format": ..., "format_version": 2, "files": {name: sha256}}

Version 1 (spotdiff before 2026-11-25 11:00 UTC) stored the unfolded, full backbone; such
directories are refused with a message to re-fit.

Loading checks the format version, that every file in the manifest exists and hashes to the
recorded SHA-256, validates ``config.json`` (:func:`spotdiff.detect.schema.check_model_config`)
before any tensor is read, and reads tensors with safetensors only (no pickle, no code executed).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError

from spotdiff.detect.schema import BACKBONE_FILE, CONFIG_FILE, MODEL_FILE, check_model_config
from spotdiff.errors import ConfigError, WeightsError
from spotdiff.files import default_mode, output_error, sha256_file

if TYPE_CHECKING:  # torch is imported where tensors are read or written: the checks of a directory need none
    import torch

FORMAT = "spotdiff-detector"
FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
MODEL_FILES = (CONFIG_FILE, MODEL_FILE, BACKBONE_FILE)
PROBE_FILE = "probe.safetensors"
OPTIONAL_FILES = (PROBE_FILE,)
"""Files a model directory may hold besides ``MODEL_FILES`` (listed in the manifest when present)."""


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _remove_stale_siblings(out: Path) -> None:
    """Delete the hidden ``.<name>.tmp-*`` / ``.<name>.old-*`` folders an interrupted save left.

    POSIX cannot rename a directory over a non-empty one, so replacing a model is two renames;
    a kill between them leaves the previous model in ``.<name>.old-*`` and no ``out`` (loading
    then says the model is missing). The next save of the same path cleans both up, but only
    folders holding nothing except model files (what spotdiff wrote): a folder of that name
    holding anything else (a user's, or files replaced with ``overwrite``) is left alone.
    """
    ours = {*MODEL_FILES, MANIFEST_FILE}
    for prefix in (f".{out.name}.tmp-", f".{out.name}.old-"):
        for stale in out.parent.glob(f"{glob.escape(prefix)}*"):
            if (
                stale.is_dir()
                and not stale.is_symlink()
                and all(p.name in ours and p.is_file() and not p.is_symlink() for p in stale.iterdir())
            ):
                shutil.rmtree(stale, ignore_errors=True)


def _listed_files(model_dir: Path) -> set[str]:
    """The file names an existing model directory's manifest lists (empty when it cannot be read), so that
    an optional file is replaced only when the model wrote it."""
    try:
        files = json.loads((model_dir / MANIFEST_FILE).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return set()
    return set(files) if isinstance(files, dict) else set()


def save_model_dir(
    out_dir: str | os.PathLike[str],
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    backbone_state: dict[str, torch.Tensor],
    overwrite: bool = False,
    probe: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a model directory atomically and return its path.

    Files are written into a temporary sibling directory, fsynced, the manifest last; the
    directory is then renamed onto ``out_dir``. An existing ``out_dir`` is replaced only when it
    is empty or is itself a model directory (has a manifest) holding nothing but the files of its
    manifest; a model directory that also holds other files (results, overlays, notes) is
    replaced, those files with it, only with ``overwrite``; anything else is refused. ``probe``
    (float32 arrays, :func:`spotdiff.detect.probe.probe_record`) is written as ``PROBE_FILE``.
    """
    from safetensors.numpy import save_file as save_arrays
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
            raise ConfigError(f"{out}: exists and is not a spotdiff model directory; refusing to overwrite it")
        ours = {*MODEL_FILES, MANIFEST_FILE, *(f for f in OPTIONAL_FILES if f in _listed_files(out))}
        others = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if others and not overwrite:
            shown = ", ".join(others[:5]) + (f" (+{len(others) - 5} more)" if len(others) > 5 else "")
            raise ConfigError(
                f"{out}: model directory also holds files that are not part of the model ({shown}); "
                "refusing to replace it: choose another --out, move them away, or give --overwrite "
                "to replace the directory and delete them"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(_contiguous(tensors), str(tmp / MODEL_FILE), metadata={"format": FORMAT})
        save_file(_contiguous(backbone_state), str(tmp / BACKBONE_FILE), metadata={"format": "pt"})
        full_config = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
        (tmp / CONFIG_FILE).write_text(json.dumps(full_config, indent=2, sort_keys=True) + "\n")
        names: tuple[str, ...] = MODEL_FILES
        if probe is not None:
            save_arrays({k: np.ascontiguousarray(v, np.float32) for k, v in probe.items()}, str(tmp / PROBE_FILE))
            names = (*MODEL_FILES, PROBE_FILE)
        for name in names:
            _fsync(tmp / name)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "files": {name: sha256_file(tmp / name) for name in names},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _fsync(tmp / MANIFEST_FILE)
        os.chmod(tmp, default_mode(directory=True))
        for name in (*names, MANIFEST_FILE):
            os.chmod(tmp / name, default_mode())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        if isinstance(exc, OSError) or (isinstance(exc, SafetensorError) and "I/O error" in str(exc)):
            raise output_error(out, exc) from exc  # disk full, read-only: one clear line
        raise
    return out


def read_model_config(model_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    """Verify a model directory without reading its tensors (and without torch): the manifest, every
    file's SHA-256, and ``config.json``'s format and contents (:func:`check_model_config`).
    Returns ``(config, files)``: the checked config and the file names the manifest lists.

    Raises:
        WeightsError: missing directory or file, unknown format or version, hash mismatch
            (tampered or truncated file), an invalid config; the message names the file.
    """
    root = Path(model_dir)
    manifest_path = root / MANIFEST_FILE
    if not root.is_dir():
        raise WeightsError(f"{root}: model directory not found")
    if not manifest_path.is_file():
        raise WeightsError(f"{manifest_path}: manifest missing; not a spotdiff model directory")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise WeightsError(f"{manifest_path}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise WeightsError(
            f"{manifest_path}: format version {version!r} is not supported (this spotdiff reads {FORMAT_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not set(MODEL_FILES) <= set(files) <= {*MODEL_FILES, *OPTIONAL_FILES}:
        raise WeightsError(f"{manifest_path}: manifest must list {list(MODEL_FILES)} (and optionally {PROBE_FILE})")
    for name in files:
        path = root / name
        if not path.is_file():
            raise WeightsError(f"{path}: file missing from model directory")
        if sha256_file(path) != files[name]:
            raise WeightsError(f"{path}: SHA-256 does not match the manifest (file modified or corrupt)")
    try:
        config = json.loads((root / CONFIG_FILE).read_text())
    except Exception as exc:  # a manifest re-written to match a broken file
        raise WeightsError(f"{root / CONFIG_FILE}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(config, dict):
        raise WeightsError(f"{root / CONFIG_FILE}: must hold a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{root / CONFIG_FILE}: format or version does not match the manifest")
    check_model_config(config, str(root / CONFIG_FILE))  # keys, types and ranges before any tensor is read
    return config, sorted(files)


def load_model_dir(
    model_dir: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Verify (:func:`read_model_config`) and read a model directory: ``(config, tensors, backbone_state)``.

    Raises:
        WeightsError: as :func:`read_model_config`, or unreadable safetensors; the message names the file.
    """
    from safetensors.torch import load_file

    root = Path(model_dir)
    config, _ = read_model_config(root)
    try:
        tensors = load_file(str(root / MODEL_FILE), device="cpu")
        backbone = load_file(str(root / BACKBONE_FILE), device="cpu")
    except Exception as exc:  # a manifest re-written to match a broken file
        raise WeightsError(f"{root}: cannot read model files ({type(exc).__name__}: {exc})") from exc
    return config, tensors, backbone
