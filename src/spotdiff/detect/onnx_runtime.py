"""The onnxruntime twin of ``Detector.predict``, torch-free: ``predict --backend onnxruntime`` runs an
exported detector (:mod:`spotdiff.detect.export`) in a process that never imports torch.

The file records, in its metadata, a fingerprint of the model directory it came from (the SHA-256
of its fitted tensors and feature network, and the config fields the graph depends on) and the
SHA-256 of its own content (:func:`graph_digest`: the graph, its initialisers and any external data,
metadata excluded). Metadata can be copied from file to file, so :class:`OnnxDetector` binds the
graph to the model by content as well: it recomputes the digest, and runs the probe images
(:mod:`spotdiff.detect.probe`) through the graph, refusing the file unless its scores and maps agree
with the ones the model directory recorded when it was saved (``probe.safetensors``, hashed by its
manifest) to ``PROBE_RTOL``. A PatchCore graph carrying a PaDiM model's metadata, or a graph with a
tensor changed, is refused even when its recorded digest was re-computed. A model directory saved
before the probe record existed is checked against its torch detector instead (torch is imported).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from spotdiff.detect import store
from spotdiff.detect.probe import probe_images, probe_mismatch, probe_record
from spotdiff.errors import ConfigError, DataError, WeightsError

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "spotdiff.model_fingerprint"
CONTENT_KEY = "spotdiff.graph_sha256"
DEFAULT_BATCH = 4
"""Images per onnxruntime call: ``spotdiff.detect.base.CPU_FORWARD_IMAGES`` (kept equal by a test)."""
_GRAPH_CONFIG_KEYS = ("model", "arch", "layers", "image_size", "d", "epsilon", "seed", "num_neighbors", "target_dim")


def missing_deploy() -> ConfigError:
    """The error when the ``deploy`` extra (onnx, onnxruntime) is not installed."""
    return ConfigError(
        'ONNX export and --backend onnxruntime need onnx and onnxruntime: pip install "spotdiff[deploy]"'
    )


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """SHA-256 over the manifest hashes of the fitted tensors and feature network, and the graph's config."""
    root = Path(model_dir)
    try:
        manifest = json.loads((root / store.MANIFEST_FILE).read_text())
        config = json.loads((root / store.CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{root}: cannot read the model's manifest/config ({exc})") from exc
    files = manifest.get("files", {}) if isinstance(manifest, dict) else {}
    payload = {
        "files": {k: files.get(k) for k in (store.MODEL_FILE, store.BACKBONE_FILE)},
        "config": {k: config.get(k) for k in _GRAPH_CONFIG_KEYS},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_graph(path: str | os.PathLike[str]) -> Any:
    """The ``onnx.ModelProto`` of ``path`` without its external data; WeightsError naming a file that is not one."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # any parse failure means "not an ONNX model"
        raise WeightsError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc


def graph_digest(path: str | os.PathLike[str], proto: Any = None) -> str:
    """SHA-256 of an ONNX file's content without its metadata: the graph and initialisers
    (deterministic protobuf serialisation) and the bytes of every external data file it names.
    ``proto``: the file's :func:`read_graph`, when the caller has it (its metadata is removed)."""
    path = Path(path)
    if proto is None:
        proto = read_graph(path)
    del proto.metadata_props[:]
    digest = hashlib.sha256(proto.SerializeToString(deterministic=True))
    locations = sorted(
        {entry.value for tensor in proto.graph.initializer for entry in tensor.external_data if entry.key == "location"}
    )
    for location in locations:
        data = path.parent / location
        if Path(location).is_absolute() or ".." in Path(location).parts or not data.is_file():
            raise WeightsError(f"{path}: external data file {location!r} missing or outside {path.parent}")
        digest.update(location.encode())
        with open(data, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


class OnnxDetector:
    """onnxruntime runner with the ``Detector.predict`` interface, on numpy arrays and without torch.

    ``image_size_``, ``calibration_`` and ``normal_maps_`` come from ``model_dir``'s verified config
    (:func:`spotdiff.detect.store.read_model_config`: manifest hashes, config schema; no tensor is
    read). The ONNX file must have been exported from that model directory, unchanged since
    (fingerprint, content digest and the probe check; see the module docstring), else
    :class:`WeightsError` naming the file. ``batch_size``: images per onnxruntime call. ``threads``:
    onnxruntime's intra-op threads (None: :func:`spotdiff.threads.session_threads`).
    """

    takes_arrays = True
    """``predict`` takes and returns numpy arrays (callers decode images without torch)."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        onnx_path: str | os.PathLike[str],
        batch_size: int = DEFAULT_BATCH,
        threads: int | None = None,
    ) -> None:
        try:
            import onnx  # noqa: F401 - read_graph needs it: say so before anything else
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - the deploy extra is missing
            raise missing_deploy() from exc
        from spotdiff.threads import session_threads

        path = Path(onnx_path)
        if not path.is_file():
            raise WeightsError(f"{path}: ONNX file not found")
        config, files = store.read_model_config(model_dir)
        proto = read_graph(path)
        meta = {p.key: p.value for p in proto.metadata_props}
        if meta.get(FINGERPRINT_KEY) != model_fingerprint(model_dir):
            raise WeightsError(
                f"{path}: was not exported from the model in {model_dir} (fingerprint differs); "
                f"re-run `spotdiff export {model_dir} --format onnx`"
            )
        if meta.get(CONTENT_KEY) != graph_digest(path, proto):
            raise WeightsError(
                f"{path}: its graph or tensors changed after export (content SHA-256 differs from "
                f"the one recorded); re-run `spotdiff export {model_dir} --format onnx`"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = session_threads() if threads is None else threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise WeightsError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from exc
        self.image_size_: tuple[int, int] = (int(config["image_size"][0]), int(config["image_size"][1]))
        self.calibration_: dict[str, Any] | None = config.get("calibration")
        self.normal_maps_: dict[str, Any] | None = config.get("normal_maps")
        self.model_type: str = config["model"]
        self.forward_batch = batch_size
        self.path = path
        self._check_behaviour(Path(model_dir), files)

    def _check_behaviour(self, model_dir: Path, files: list[str]) -> None:
        """WeightsError unless the graph scores the probe images as the model directory recorded."""
        if store.PROBE_FILE in files:
            from safetensors.numpy import load_file

            try:
                record = load_file(str(model_dir / store.PROBE_FILE))
            except Exception as exc:  # a manifest re-written to match a broken file
                raise WeightsError(f"{model_dir / store.PROBE_FILE}: unreadable ({type(exc).__name__})") from exc
        else:  # saved before probe records existed: ask the torch detector
            log.info(
                f"{model_dir}: no {store.PROBE_FILE} (saved before probe records existed); checking the "
                "graph against the torch detector, which imports torch. Re-fit, or load and save the model "
                "to a new directory, to check it without torch"
            )
            import torch

            from spotdiff.detect.base import Detector

            scores, maps = Detector.load(model_dir).predict(torch.from_numpy(probe_images(self.image_size_)))
            record = probe_record(scores.numpy(), maps.numpy())
        if set(record) != {"scores", "maps"}:
            raise WeightsError(f"{model_dir / store.PROBE_FILE}: expected the tensors scores and maps")
        try:
            got_scores, got_maps = self.predict(probe_images(self.image_size_))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise WeightsError(f"{self.path}: onnxruntime cannot run it ({type(exc).__name__})") from exc
        problem = probe_mismatch(got_scores, got_maps, record)
        if problem:
            raise WeightsError(
                f"{self.path}: does not compute what the model in {model_dir} computes ({problem}): "
                f"not this model's graph or tensors; re-run `spotdiff export {model_dir} --format onnx`"
            )

    def predict(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """Image scores ``(B,)`` and maps ``(B, H, W)`` (float32 arrays) of ``images`` ``(B, 3, H, W)`` in
        [0, 1] at the model's image size (a float array, or anything ``np.asarray`` reads: a CPU tensor)."""
        batch = np.asarray(images, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1] != 3 or tuple(batch.shape[-2:]) != self.image_size_:
            raise DataError(
                f"predict expects (B, 3, {self.image_size_[0]}, {self.image_size_[1]}) images (the model's "
                f"size), got {batch.shape}"
            )
        scores, maps = [], []
        for start in range(0, batch.shape[0], self.forward_batch):
            chunk = np.ascontiguousarray(batch[start : start + self.forward_batch])
            s, m = self.session.run(["scores", "maps"], {"images": chunk})
            scores.append(s)
            maps.append(m)
        return np.concatenate(scores), np.concatenate(maps)
