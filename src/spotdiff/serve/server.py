"""Start the service: validate and load every model, open the audit log, then run uvicorn.

Everything that can be wrong with the command (a model directory, an ONNX file, the key file, the
bind address without a key, the audit log) fails before the socket is opened: one line, exit 2.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from spotdiff.detect.scoring import ERROR
from spotdiff.errors import ConfigError
from spotdiff.serve.audit import AuditLog
from spotdiff.serve.config import ServeConfig, check_bind
from spotdiff.serve.scoring import ServedModel, load_served_model, score_alone

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """``NAME=DIR`` or ``DIR`` (the name is then the directory's name) -> ``(name, dir)``."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec.rstrip("/")).name, spec
    if not NAME_PATTERN.match(name):
        raise ConfigError(
            f"model name {name!r} (from {spec!r}): use letters, digits, '_', '.', '-' (at most 64), or give NAME=DIR"
        )
    return name, Path(path)


def load_models(
    specs: Sequence[str],
    backend: str = "torch",
    onnx_files: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> list[ServedModel]:
    """Load every model of ``specs`` (see :func:`parse_model_spec`); ``onnx_files`` one per spec, in order,
    for ``backend="onnxruntime"``. Each model scores one blank image first: a model that fails or
    returns a non-finite score is refused here, not at the first part."""
    if onnx_files and len(onnx_files) != len(specs):
        raise ConfigError(
            f"--onnx needs one file per model directory: {len(onnx_files)} file(s) for {len(specs)} model(s)"
        )
    models, seen = [], set()
    for i, spec in enumerate(specs):
        name, path = parse_model_spec(spec)
        if name in seen:
            raise ConfigError(f"two models are named {name!r}; name them with NAME=DIR")
        seen.add(name)
        model = load_served_model(name, path, backend, onnx_files[i] if onnx_files else None, device)
        from PIL import Image

        height, width = model.image_size
        check = score_alone(model, model.scorer.decode_image(Image.new("RGB", (width, height)), "a blank image"))
        if check.decision == ERROR:
            raise ConfigError(f"{path}: the model fails on a blank image ({check.error})")
        models.append(model)
    return models


def serve(
    specs: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "torch",
    onnx_files: Sequence[str] | None = None,
    audit_log: str | os.PathLike[str] = "audit.jsonl",
    config: ServeConfig | None = None,
    device: str = "auto",
) -> None:
    """Validate everything, then serve until interrupted (blocks)."""
    import uvicorn

    from spotdiff.serve.app import create_app

    config = config or ServeConfig()
    check_bind(host, config.api_keys)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    from spotdiff.devices import resolve_device

    models = load_models(specs, backend, onnx_files, resolve_device(device) if backend == "torch" else "cpu")
    audit = AuditLog(audit_log)
    app = create_app(models, audit, config)
    log.info(
        f"serving {', '.join(m.name for m in models)} ({backend}) on http://{host}:{port}; "
        f"audit log {Path(audit_log).resolve()}; API key {'required' if config.api_keys else 'not required (loopback)'}"
    )
    uvicorn.run(
        app, host=host, port=port, log_level="warning", access_log=False, timeout_keep_alive=5, server_header=False
    )
