"""ONNX export of a whole fitted detector (run by :class:`spotdiff.detect.onnx_runtime.OnnxDetector`).

The exported graph maps ``images`` ``(B, 3, H, W)`` float32 in [0, 1] at the model's image size
(``B`` dynamic) to ``scores`` ``(B,)`` and ``maps`` ``(B, H, W)``, doing everything
``Detector.predict`` does after resizing: ImageNet normalisation, then the detector's own fitted
head (:meth:`Detector.head`, the module ``predict`` runs, built ``traceable``: see
:mod:`spotdiff.detect.head`). Nothing is re-implemented or re-estimated here; this module holds
only graph capture, external data and the metadata that binds the file to its model directory
(fingerprint and content digest, see :mod:`spotdiff.detect.onnx_runtime`). Graphs whose
initialisers exceed ONNX's 2 GB protobuf limit (e.g. PaDiM with wide_resnet50_2 at 256 px: 4096
positions x 550^2 float32 = 5 GB) are written with ONNX external data in one ``<file>.data``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from spotdiff.data.transforms import normalize
from spotdiff.detect.base import Detector
from spotdiff.detect.head import DetectorHead
from spotdiff.detect.onnx_runtime import CONTENT_KEY, FINGERPRINT_KEY, graph_digest, missing_deploy, model_fingerprint
from spotdiff.errors import ConfigError, WeightsError
from spotdiff.files import atomic_path, output_error

OPSET = 18
PROTOBUF_LIMIT = 2**31 - 1
"""Bytes: above this the graph's tensors go to external data (the protobuf message limit)."""
__all__ = ["ImageGraph", "detector_graph", "export_onnx", "graph_bytes"]


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
        raise missing_deploy() from exc
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
