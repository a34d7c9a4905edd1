"""ONNX export of a whole fitted detector, and an onnxruntime twin of ``Detector.predict``.

The exported graph maps ``images`` ``(B, 3, H, W)`` float32 in [0, 1] at the model's image size
(``B`` dynamic) to ``scores`` ``(B,)`` and ``maps`` ``(B, H, W)``, doing everything
``Detector.predict`` does after resizing: ImageNet normalisation, the BN-folded backbone, feature
assembly, the Mahalanobis (PaDiM) or nearest-neighbour (PatchCore) distance, upsampling and
Gaussian smoothing (the same separable matrices as :func:`spotdiff.detect.features.upsample_and_smooth`)
and the image score. It reads the fitted tensors of the detector; nothing is re-estimated.

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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spotdiff.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from spotdiff.detect import store
from spotdiff.detect.base import CPU_FORWARD_IMAGES, Detector
from spotdiff.detect.features import GAUSSIAN_SIGMA, _axis_operator
from spotdiff.errors import ConfigError, WeightsError
from spotdiff.files import atomic_path, output_error
from spotdiff.models import layer_channels

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


class _Graph(nn.Module):
    """Shared part of the exported graphs: normalisation, backbone, map smoothing."""

    def __init__(self, model: Detector) -> None:
        super().__init__()
        assert model.image_size_ is not None
        self.backbone = model.backbone_
        self.layers = list(model.layers_)
        self.image_size_ = model.image_size_
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def _features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """As :func:`spotdiff.models.extract_features`, but with the stem batched (same arithmetic per image)."""
        m = self.backbone
        x = (images - self.pixel_mean) / self.pixel_std
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        out = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            if len(out) == len(self.layers):
                break
            x = getattr(m, name)(x)
            if name in self.layers:
                out[name] = x
        return out

    def _maps(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, h, w)`` patch scores -> image scores (map maximum) and smoothed maps, as ``upsample_and_smooth``."""
        rows = self.map_rows  # type: ignore[has-type]
        cols = self.map_cols_t  # type: ignore[has-type]
        maps = torch.matmul(torch.matmul(rows, grid), cols)
        return maps.flatten(1).amax(dim=1), maps

    def _set_map_operators(self) -> None:
        """Find the feature grid ``(h, w)`` of ``layers[0]`` (one forward pass) and store the map operators."""
        with torch.no_grad():
            grid = tuple(self._features(torch.zeros(1, 3, *self.image_size_))[self.layers[0]].shape[-2:])
        self.grid: tuple[int, int] = (int(grid[0]), int(grid[1]))
        h, w = self.image_size_
        self.register_buffer("map_rows", _axis_operator(self.grid[0], h, GAUSSIAN_SIGMA).to(torch.float32))
        self.register_buffer(
            "map_cols_t", _axis_operator(self.grid[1], w, GAUSSIAN_SIGMA).to(torch.float32).T.contiguous()
        )


class PaDiMGraph(_Graph):
    """PaDiM: selected channels, nearest upsampling, ``||L^-1 (x - mu)||`` per position."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        assert model.mean_ is not None and model.inv_chol_ is not None
        index = model.channel_index_.cpu()
        self.parts: list[tuple[str, str]] = []
        offset = 0
        for i, (name, channels) in enumerate(zip(self.layers, layer_channels(model.arch, self.layers), strict=True)):
            inside = index[(index >= offset) & (index < offset + channels)] - offset
            offset += channels
            if inside.numel():
                self.register_buffer(f"index_{i}", inside.clone())
                self.parts.append((name, f"index_{i}"))
        self.register_buffer("mean", model.mean_.detach().cpu().float().clone())
        self.register_buffer("inv_chol", model.inv_chol_.detach().cpu().float())  # shared with the model: no copy
        self._set_map_operators()
        if self.grid[0] * self.grid[1] != self.mean.shape[0]:
            raise WeightsError(f"PaDiM grid {self.grid} does not match its {self.mean.shape[0]} fitted positions")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self._features(images)
        parts = []
        for name, buffer in self.parts:
            part = feats[name].index_select(1, getattr(self, buffer))
            if part.shape[-2:] != feats[self.layers[0]].shape[-2:]:
                part = F.interpolate(part, size=self.grid, mode="nearest")
            parts.append(part)
        emb = torch.cat(parts, dim=1).flatten(2).permute(2, 0, 1)  # (P, B, d)
        # rows L^-1 (x - mu); onnxruntime folds the constant transpose once, at session start
        z = torch.matmul(emb - self.mean[:, None, :], self.inv_chol.transpose(1, 2))  # (P, B, d)
        dist = torch.sqrt((z * z).sum(dim=-1)).transpose(0, 1)  # (B, P)
        return self._maps(dist.reshape(-1, self.grid[0], self.grid[1]))


class PatchCoreGraph(_Graph):
    """PatchCore: locally averaged patches, nearest bank element, paper eq. 7 image score."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        assert model.memory_bank_ is not None
        bank = model.memory_bank_.detach().cpu().float().contiguous()
        self.register_buffer("bank", bank)
        # [-2 b^T; ||b||^2] (C + 1, M): [q, 1] @ it = ||b||^2 - 2 q.b in one matrix product
        self.register_buffer("bank_aug", torch.cat([-2.0 * bank.T, (bank * bank).sum(dim=1)[None]]).contiguous())
        self.num_neighbors = min(int(model.num_neighbors), bank.shape[0])
        total = sum(layer_channels(model.arch, self.layers))
        self.target_dim = model.target_dim
        if self.target_dim is not None and self.target_dim != total:
            # adaptive average pooling over channels is linear: the matrix of its effect on unit vectors
            eye = torch.eye(total, dtype=torch.float64)[:, None, :]
            self.register_buffer("channel_pool", F.adaptive_avg_pool1d(eye, self.target_dim)[:, 0].float())
        else:
            self.target_dim = None
        self._set_map_operators()

    def _partial_sq(self, rows: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` -> ``(N, M)``: ``||b||^2 - 2 q.b`` for every row ``q`` and bank element ``b``."""
        return torch.matmul(torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1), self.bank_aug)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self._features(images)
        parts = []
        for name in self.layers:
            part = F.avg_pool2d(feats[name], kernel_size=3, stride=1, padding=1, count_include_pad=False)
            if part.shape[-2:] != feats[self.layers[0]].shape[-2:]:
                part = F.interpolate(part, size=self.grid, mode="bilinear", align_corners=False)
            parts.append(part)
        patches = torch.cat(parts, dim=1).flatten(2).transpose(1, 2)  # (B, P, C)
        if self.target_dim is not None:
            patches = torch.matmul(patches, self.channel_pool)
        # ||q - b||^2 = ||q||^2 + (||b||^2 - 2 q.b): the row constant ||q||^2 is added after the minimum,
        # so the (B P, M) distance table is written by one matrix product and read by one arg-min
        b, p, c = patches.shape
        partial = self._partial_sq(patches.reshape(b * p, c))  # (B P, M)
        nearest = partial.argmin(dim=1, keepdim=True)
        partial_min = partial.gather(1, nearest).reshape(b, p)
        nearest = nearest.reshape(b, p)
        patch_scores = torch.sqrt(torch.clamp(partial_min + (patches * patches).sum(-1), min=0.0))
        best = patch_scores.argmax(dim=1, keepdim=True)  # (B, 1)
        s_star = patch_scores.gather(1, best)[:, 0]
        m_test = patches.gather(1, best[:, :, None].expand(-1, 1, patches.shape[-1]))  # (B, 1, C)
        m_star = self.bank.index_select(0, nearest.gather(1, best)[:, 0])  # (B, C)
        star_partial = self._partial_sq(m_star)  # ||m* - b||^2 - ||m*||^2: the same order over b
        support = torch.topk(star_partial, self.num_neighbors, dim=1, largest=False).indices  # (B, b)
        neighbours = self.bank.index_select(0, support.reshape(-1)).reshape(support.shape[0], support.shape[1], -1)
        d_support = torch.sqrt(((neighbours - m_test) ** 2).sum(-1))  # (B, b)
        scores = (1.0 - torch.exp(s_star - torch.logsumexp(d_support, dim=1))) * s_star
        _, maps = self._maps(patch_scores.reshape(-1, self.grid[0], self.grid[1]))
        return scores, maps


def detector_graph(model: Detector) -> nn.Module:
    """The exportable ``nn.Module`` of a fitted PaDiM or PatchCore (on CPU, eval mode)."""
    from spotdiff.detect import PaDiM, PatchCore

    if model.image_size_ is None:
        raise ConfigError(f"{type(model).__name__} is not fitted; nothing to export")
    model.backbone_ = model.backbone_.cpu()
    graph = {PaDiM: PaDiMGraph, PatchCore: PatchCoreGraph}[type(model)](model)
    return graph.eval().requires_grad_(False)


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
    naming the file. The torch detector is loaded for the probe and then released.
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
        if threads is not None:
            options.intra_op_num_threads = threads
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
