"""ONNX export of a whole fitted detector, and an onnxruntime twin of ``Detector.predict``.

The exported graph maps ``images`` ``(B, 3, H, W)`` float32 in [0, 1] at the model's image size
(``B`` dynamic) to ``scores`` ``(B,)`` and ``maps`` ``(B, H, W)``, doing everything
``Detector.predict`` does after resizing: ImageNet normalisation, then the detector's own fitted
head (:meth:`Detector.head`, the module ``predict`` runs, built ``traceable``: see
:mod:`spotdiff.detect.head`). Nothing is re-implemented or re-estimated here; this module holds
only graph capture, external data, the fingerprint and digest, and the onnxruntime runner.

The file records, in its metadata, a fingerprint of the model directory it came from (the
SHA-256 of its fitted tensors and feature network, and the config fields the graph depends on)
and the SHA-256 of its own content (:func:`graph_digest`: the graph, its initialisers and any
external data, metadata excluded). Metadata can be copied from file to file, so
:class:`OnnxDetector` binds the graph to the model by content as well: it recomputes the digest,
and runs ``PROBE_IMAGES`` seeded noise images through both the ONNX graph and the model directory's
torch detector, refusing the file unless scores and maps agree to ``PROBE_RTOL``. A PatchCore
graph carrying a PaDiM model's metadata, or a graph with a tensor changed, is refused even when
its recorded digest was re-computed. Graphs whose
initialisers exceed ONNX's 2 GB protobuf limit (e.g. PaDiM with wide_resnet50_2 at 256 px: 4096
positions x 550^2 float32 = 5 GB) are written with ONNX external data in one ``<file>.data``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spotdiff.data.transforms import normalize
from spotdiff.detect import store
from spotdiff.detect.base import CPU_FORWARD_IMAGES, Detector
from spotdiff.detect.head import DetectorHead
from spotdiff.errors import ConfigError, WeightsError
from spotdiff.files import atomic_path, output_error
from spotdiff.threads import session_threads

OPSET = 18
PROTOBUF_LIMIT = 2**31 - 1
"""Bytes: above this the graph's tensors go to external data (the protobuf message limit)."""
FINGERPRINT_KEY = "spotdiff.model_fingerprint"
CONTENT_KEY = "spotdiff.graph_sha256"
PROBE_IMAGES = 2
PROBE_RTOL = 1e-3
"""Largest relative difference, against the largest torch value, of probe scores and maps between the
ONNX graph and the torch detector (our choice: 10x the 1e-4 parity measured in tests/test_onnx_export.py)."""
_GRAPH_CONFIG_KEYS = ("model", "arch", "layers", "image_size", "d", "epsilon", "seed", "num_neighbors", "target_dim")


def _missing_deploy() -> ConfigError:
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


def graph_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of an ONNX file's content without its metadata: the graph and initialisers
    (deterministic protobuf serialisation) and the bytes of every external data file it names."""
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # any parse failure means "not an ONNX model"
        raise WeightsError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc
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


class ImageGraph(nn.Module):
    """What is exported: images ``(B, 3, H, W)`` in [0, 1] -> ImageNet normalisation -> a traceable head."""

    def __init__(self, head: DetectorHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(normalize(images))


def detector_graph(model: Detector) -> nn.Module:
    """The exportable ``nn.Module`` of a fitted detector: its traceable head (a CPU copy; ``model`` and
    its backbone are left on their device, in their mode), eval mode, no gradients."""
    if model.image_size_ is None:
        raise ConfigError(f"{type(model).__name__} is not fitted; nothing to export")
    return ImageGraph(model.head(traceable=True)).eval().requires_grad_(False)


def graph_bytes(graph: nn.Module) -> int:
    """Bytes of the graph's parameters and buffers (what goes into the ONNX initialisers)."""
    return sum(t.numel() * t.element_size() for t in (*graph.parameters(), *graph.buffers()))


def export_onnx(
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    external_data: bool | None = None,
    example_batch: int = 2,
) -> Path:
    """Export the detector of ``model_dir`` to ``out`` (ONNX, opset ``OPSET``, dynamic batch).

    ``out`` (and ``<out>.data``) may not lie inside ``model_dir``, nor be one of its files.

    ``external_data``: None = only when the tensors exceed ``PROTOBUF_LIMIT``; then they are written
    to ``<out>.data`` beside ``out``. Both files are written atomically (nothing half-written).
    Uses torch's default (dynamo, ``torch.export``-based) ONNX exporter.
    """
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - the deploy extra is missing
        raise _missing_deploy() from exc
    out = Path(out)
    for target in (out, out.parent / f"{out.name}.data"):
        if target.resolve().is_relative_to(Path(model_dir).resolve()):
            raise ConfigError(
                f"{target}: inside the model directory {model_dir}; refusing to write there "
                "(it could replace the model's own files): choose --out outside it"
            )
    model = Detector.load(model_dir)
    graph = detector_graph(model)
    if external_data is None:
        external_data = graph_bytes(graph) > PROTOBUF_LIMIT
    out = Path(out)
    data_name = f"{out.name}.data"
    assert model.image_size_ is not None
    example = torch.rand(example_batch, 3, *model.image_size_, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent if out.parent.is_dir() else None))
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph,
                (example,),
                input_names=["images"],
                output_names=["scores", "maps"],
                opset_version=OPSET,
                dynamic_shapes=({0: batch},),
                dynamo=True,
                external_data=external_data,
                verbose=False,
            )
        if program is None:  # dynamo=True always returns one; None only from the legacy exporter
            raise WeightsError(f"{out}: torch.onnx.export returned no program")
        tmp_onnx = work / out.name
        program.save(str(tmp_onnx), external_data=external_data)
        proto = onnx.load(str(tmp_onnx), load_external_data=False)
        metadata = {
            FINGERPRINT_KEY: model_fingerprint(model_dir),
            CONTENT_KEY: graph_digest(tmp_onnx),
            "spotdiff.model": model.model_type,
            "spotdiff.image_size": json.dumps(list(model.image_size_)),
        }
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        tmp_onnx.write_bytes(proto.SerializeToString())  # the content (and external data) unchanged
        onnx.checker.check_model(str(tmp_onnx)) if external_data else onnx.checker.check_model(onnx.load(str(tmp_onnx)))
        if external_data:  # the .onnx names "<out>.data"; write the data first so a found .onnx is complete
            produced = [p for p in work.iterdir() if p.name != out.name]
            if len(produced) != 1:
                raise WeightsError(f"{out}: exporter wrote {len(produced)} external data files, expected 1")
            if produced[0].name != data_name:
                raise WeightsError(f"{out}: external data file named {produced[0].name}, expected {data_name}")
            with atomic_path(out.parent / data_name) as tmp:
                shutil.copyfile(produced[0], tmp)
        with atomic_path(out) as tmp:
            shutil.copyfile(tmp_onnx, tmp)
    except OSError as exc:
        raise output_error(out, exc) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


class OnnxDetector:
    """onnxruntime runner with the ``Detector.predict`` interface, for ``predict --backend onnxruntime``.

    ``image_size``, ``calibration`` and the fingerprint come from ``model_dir``; the ONNX file must
    have been exported from that model directory, unchanged since (fingerprint, content digest and
    a probe run against the torch detector; see the module docstring), else :class:`WeightsError`
    naming the file. The torch detector is loaded for the probe and then released. ``threads``:
    onnxruntime's intra-op threads (None: the count the thread rule gave torch, ``session_threads``).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        onnx_path: str | os.PathLike[str],
        batch_size: int = CPU_FORWARD_IMAGES,
        threads: int | None = None,
    ) -> None:
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - the deploy extra is missing
            raise _missing_deploy() from exc
        path = Path(onnx_path)
        if not path.is_file():
            raise WeightsError(f"{path}: ONNX file not found")
        model = Detector.load(model_dir)  # verifies the model directory's hashes and schema
        try:
            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not an ONNX model"
            raise WeightsError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc
        if meta.get(FINGERPRINT_KEY) != model_fingerprint(model_dir):
            raise WeightsError(
                f"{path}: was not exported from the model in {model_dir} (fingerprint differs); "
                f"re-run `spotdiff export {model_dir} --format onnx`"
            )
        if meta.get(CONTENT_KEY) != graph_digest(path):
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
        assert model.image_size_ is not None
        self.image_size_: tuple[int, int] = model.image_size_
        self.calibration_ = model.calibration_
        self.forward_batch = batch_size
        self.path = path
        self._check_behaviour(model, model_dir)

    def _check_behaviour(self, model: Detector, model_dir: str | os.PathLike[str]) -> None:
        """WeightsError unless the graph scores ``PROBE_IMAGES`` seeded noise images as ``model`` does."""
        probe = torch.rand(PROBE_IMAGES, 3, *self.image_size_, generator=torch.Generator().manual_seed(0))
        want_scores, want_maps = model.predict(probe)
        try:
            got_scores, got_maps = self.predict(probe)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise WeightsError(f"{self.path}: onnxruntime cannot run it ({type(exc).__name__})") from exc
        for name, got, want in (("scores", got_scores, want_scores), ("maps", got_maps, want_maps)):
            scale = float(want.abs().max()) or 1.0
            if got.shape != want.shape or not bool(((got - want).abs() <= PROBE_RTOL * scale).all()):
                raise WeightsError(
                    f"{self.path}: does not compute what the model in {model_dir} computes (its "
                    f"{name} on {PROBE_IMAGES} probe images differ by more than {PROBE_RTOL:g} "
                    "relative): not this model's graph or tensors; re-run "
                    f"`spotdiff export {model_dir} --format onnx`"
                )

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``(B,)`` and maps ``(B, H, W)`` float32 CPU tensors, like ``Detector.predict``."""
        images = images.to(torch.float32).cpu()
        if tuple(images.shape[-2:]) != self.image_size_:
            images = F.interpolate(images, size=self.image_size_, mode="bilinear", align_corners=False, antialias=True)
        scores, maps = [], []
        for start in range(0, images.shape[0], self.forward_batch):
            chunk = np.ascontiguousarray(images[start : start + self.forward_batch].numpy())
            s, m = self.session.run(["scores", "maps"], {"images": chunk})
            scores.append(torch.from_numpy(s))
            maps.append(torch.from_numpy(m))
        return torch.cat(scores), torch.cat(maps)
