"""Common machinery of the 1-class detectors: backbone, batching, normalisation, save/load.

A detector is fitted on normal images only and scores new images:

* ``fit(dataset)``: ``dataset[i]`` is a dict with ``"image"``: float ``(3, H, W)`` in [0, 1] (as
  returned by :func:`spotdiff.data.open_dataset`) or such a tensor directly. All training images
  share one size (the data layer resizes them); that size becomes the model's ``image_size_``.
* ``predict(images)``: ``(B, 3, H, W)`` float in [0, 1] -> ``(scores (B,), maps (B, H', W'))`` as
  float32 CPU torch tensors, ``(H', W') = image_size_``. Images of another size are resized
  (bilinear, antialiased) to ``image_size_`` first, so maps are always at the model's size.

scikit-learn's estimator conventions: the constructor only stores its arguments (``get_params`` /
``set_params`` / ``repr``; ``type(m)(**m.get_params())`` is an unfitted copy); ``check_params``
validates them; ``fit`` and ``load`` build the backbone; fitted state ends in ``_``.
"""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self, cast

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models import ResNet

from spotdiff.data.loader import ItemDataset, batches, decode_workers
from spotdiff.data.transforms import normalize
from spotdiff.detect import schema, store
from spotdiff.detect.colour import NORMAL_SAMPLE, normal_statistics
from spotdiff.detect.features import check_layers
from spotdiff.detect.head import DetectorHead
from spotdiff.detect.probe import probe_images, probe_record
from spotdiff.devices import resolve_device
from spotdiff.errors import ConfigError, DataError, WeightsError
from spotdiff.models import WeightsLike, build_backbone, check_arch, file_record, inference_backbone, load_weights
from spotdiff.progress import progress

CPU_FORWARD_IMAGES = 4
"""On CPU, the most images per backbone forward pass (and loader batch) in ``fit`` and ``predict``.
Larger batches are not faster there (ResNet-18 to layer3 at 256 px, 1 thread: 33.9 ms per image
at 4, 38.0 at 16) and only add activation memory (about 9 MB per image)."""


def make_backbone(arch: str, weights: WeightsLike, seed: int) -> ResNet:
    """``build_backbone`` in eval mode; random init is drawn from ``seed`` without touching the global RNG.

    Detectors keep only ``inference_backbone`` of it as ``backbone_`` (BatchNorm folded,
    channels-last, stages after the deepest used layer dropped); that is also what they save.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(arch, weights)
    return model.eval().requires_grad_(False)


def load_feature_weights(net: ResNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a saved feature network (:func:`spotdiff.models.inference_backbone` layout) strictly."""
    own = net.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    bad = [k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad:
        raise WeightsError(
            f"{source} does not fit the {type(net).__name__} feature network: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, mismatched shapes {sorted(bad)[:5]}"
        )
    net.load_state_dict(state)


def _batch_images(batch: Any) -> torch.Tensor:
    images = batch["image"] if isinstance(batch, dict) else batch
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"expected image batches of shape (B, 3, H, W), got {getattr(images, 'shape', type(images))}")
    return images


class Detector(ABC):
    """Base class of PaDiM and PatchCore (see module docstring for the API)."""

    model_type: ClassVar[str]

    def __init__(
        self,
        arch: str,
        weights: WeightsLike,
        layers: Sequence[str],
        seed: int,
        batch_size: int,
        device: str | torch.device,
        num_workers: int | None,
    ) -> None:
        # scikit-learn convention: the constructor only stores its arguments; fit() checks them
        # (check_params) and builds the backbone; fitted state ends with "_"
        self.arch = arch
        self.weights = weights
        self.layers = layers
        self.seed = seed
        self.batch_size = batch_size
        self.device = device
        self.num_workers = num_workers

    data_source_: dict[str, Any] | None = None
    """Where the training images came from (the CLI records root, object, split and split seed);
    saved in ``config.json`` so ``spotdiff test`` can open the matching test split."""
    calibration_: dict[str, Any] | None = None
    """Thresholds and normal-score distribution (:mod:`spotdiff.detect.calibration`); None until calibrated."""
    image_size_: tuple[int, int] | None = None
    """``(H, W)`` of the training images, None until fitted or loaded."""

    # ----------------------------------------------------------------------------- parameters
    @classmethod
    def _param_names(cls) -> list[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor arguments by name (scikit-learn's ``get_params``; ``deep`` is accepted and ignored)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Self:
        """Set constructor arguments (take effect at the next ``fit``); unknown names raise ``ConfigError``."""
        names = self._param_names()
        for name, value in params.items():
            if name not in names:
                raise ConfigError(f"{type(self).__name__} has no parameter {name!r}; choose from {names}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def check_params(self) -> Self:
        """Validate the constructor arguments (cheap: no weights are read); ``fit`` calls it first."""
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        check_arch(self.arch)
        check_layers(self.layers)
        schema.check_seed(self.seed)
        return self

    def _build_backbone(self, weights: WeightsLike) -> None:
        """Set ``backbone_`` (inference form on ``device_``), ``backbone_source_`` and ``weights_record_``."""
        self.device_ = resolve_device(str(self.device))  # `auto` too, like every command
        self.layers_ = check_layers(self.layers)
        loaded = load_weights(self.arch, weights)
        self.backbone_ = inference_backbone(make_backbone(self.arch, loaded, self.seed), self.layers_).to(self.device_)
        # a file, else the weights' name (e.g. weights re-estimated in memory by --bn-recalibrate)
        self.backbone_source_ = (
            f"random init, seed {self.seed}"
            if loaded.is_random
            else loaded.file or loaded.name or "weights given in memory"
        )
        self.weights_record_: dict[str, str | None] = loaded.record()
        """Provenance of the backbone weights, ``{name, file, sha256}`` (see :func:`spotdiff.models.load_weights`)."""
        self._normal_maps: dict[str, Any] | None = None
        self._normal_sample: list[torch.Tensor] = []  # a few training images, scored after fitting

    def _start_fit(self) -> None:
        """Common start of ``fit``: check parameters, build the backbone, forget earlier fitted state."""
        self.check_params()
        self._build_backbone(self.weights)
        self.num_workers_ = decode_workers(self.num_workers)
        """Image-decoding threads used by ``fit`` (:func:`spotdiff.data.loader.decode_workers`)."""
        self.image_size_ = None

    @property
    def forward_batch(self) -> int:
        """Images per backbone forward pass: ``batch_size``, capped at ``CPU_FORWARD_IMAGES`` on CPU."""
        on_cpu = resolve_device(str(self.device)).type == "cpu"
        return min(self.batch_size, CPU_FORWARD_IMAGES) if on_cpu else self.batch_size

    # ----------------------------------------------------------------------------- fitting
    def _training_batches(self, dataset: ItemDataset, desc: str) -> Iterator[torch.Tensor]:
        """Normalised batches of ``forward_batch`` images on ``device_``; sets ``image_size_`` and ``n_train_``."""
        n = len(dataset)
        if n == 0:
            raise DataError("the training set is empty: no normal images to fit on")
        loader = batches(dataset, self.forward_batch, self.num_workers_)
        self.n_train_ = 0
        self._normal_maps, self._normal_sample = None, []
        keep = set(np.linspace(0, n - 1, min(n, NORMAL_SAMPLE)).round().astype(int).tolist())
        for batch in progress(loader, desc=desc, total=-(-n // self.forward_batch), unit="batch"):
            images = _batch_images(batch)
            size = (int(images.shape[-2]), int(images.shape[-1]))
            if self.image_size_ is None:
                self.image_size_ = size
            elif size != self.image_size_:
                raise DataError(f"training images must share one size; got {size} after {self.image_size_}")
            self._normal_sample += [images[i].cpu() for i in range(images.shape[0]) if self.n_train_ + i in keep]
            self.n_train_ += images.shape[0]
            yield normalize(images.to(self.device_, torch.float32))

    def _check_fitted(self, name: str, tensor: torch.Tensor) -> None:
        """DataError when a fitted tensor holds NaN or infinity (features that went bad): never fitted."""
        if not bool(torch.isfinite(tensor).all()):
            raise DataError(
                f"{type(self).__name__}: the fitted {name} holds {int((~torch.isfinite(tensor)).sum())} "
                "non-finite value(s) (NaN or infinity): the backbone's features went bad on these "
                "images; check the weights (--weights) and the training images"
            )

    @abstractmethod
    def fit(self, dataset: ItemDataset) -> Self:
        """Fit on normal images; returns self (folders or path lists: :func:`spotdiff.detect.fit_folder`)."""

    # ----------------------------------------------------------------------------- inference
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device_, torch.float32)
        if tuple(images.shape[-2:]) != self.image_size_:
            images = F.interpolate(images, size=self.image_size_, mode="bilinear", align_corners=False, antialias=True)
        return normalize(images)

    @abstractmethod
    def head(self, traceable: bool = False) -> DetectorHead:
        """The fitted head as an ``nn.Module`` (normalised images -> scores, maps; :mod:`spotdiff.detect.head`):
        eager on the model's own tensors (``predict``), or ``traceable``, a CPU copy for graph capture
        (``export``) that leaves the model as it was."""

    def _predict_normalized(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(B,)`` and maps ``(B, H, W)`` of ImageNet-normalised images at ``image_size``: the eager head."""
        return self.head()(images)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``(B,)`` and anomaly maps ``(B, H, W)`` (float32 CPU tensors), higher = more anomalous.

        Images go through the backbone ``forward_batch`` at a time, so memory does not grow with ``B``
        beyond the outputs.
        """
        if self.image_size_ is None:
            raise ConfigError(f"{type(self).__name__} is not fitted; call fit() or load() first")
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"predict expects a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        scores = torch.empty(images.shape[0])
        maps = torch.empty(images.shape[0], *self.image_size_)
        step = self.forward_batch
        for start in range(0, images.shape[0], step):
            chunk_scores, chunk_maps = self._predict_normalized(self._prepare(images[start : start + step]))
            scores[start : start + step] = chunk_scores
            maps[start : start + step] = chunk_maps
        return scores, maps

    @property
    def normal_maps_(self) -> dict[str, Any] | None:
        """Statistics of the maps of ``NORMAL_SAMPLE`` training images (see :mod:`spotdiff.detect.colour`),
        computed once after fitting; None for a model loaded from a directory that predates them."""
        if self._normal_maps is None and self._normal_sample and self.image_size_ is not None:
            scores, maps = self.predict(torch.stack(self._normal_sample))
            self._normal_maps, self._normal_sample = normal_statistics(scores.numpy(), maps.numpy()), []
        return self._normal_maps

    # ----------------------------------------------------------------------------- persistence
    @abstractmethod
    def _config(self) -> dict[str, Any]:
        """Hyper-parameters needed to rebuild the detector (JSON-serialisable)."""

    @abstractmethod
    def _state(self) -> dict[str, torch.Tensor]:
        """Fitted tensors."""

    @abstractmethod
    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install fitted tensors (the inverse of ``_state``)."""

    def save(self, out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the fitted model as a self-contained directory (see :mod:`spotdiff.detect.store`).

        The config and tensors are validated first (:mod:`spotdiff.detect.schema`): a non-finite
        statistic is a :class:`DataError` and nothing is written. ``overwrite``: replace a model
        directory that also holds files not in its manifest (they are deleted with it).
        """
        if self.image_size_ is None:
            raise ConfigError(f"{type(self).__name__} is not fitted; nothing to save")
        config = {
            "model": self.model_type,
            "arch": self.arch,
            "layers": self.layers_,
            "seed": self.seed,
            "image_size": list(self.image_size_),
            "n_train": self.n_train_,
            "backbone_source": self.backbone_source_,
            "weights": self.weights_record_,
            "data_source": self.data_source_ or {},
            **({"normal_maps": self.normal_maps_} if self.normal_maps_ else {}),
            **({"calibration": self.calibration_} if self.calibration_ else {}),
            **self._config(),
        }
        state, backbone = self._state(), self.backbone_.state_dict()
        try:  # nothing non-finite or inconsistent goes into a model directory
            schema.check_model_config(config, "config")
            schema.check_model_tensors(config, state, backbone, "fitted model")
        except WeightsError as exc:
            raise DataError(f"{out_dir}: not written: {exc}") from exc
        return store.save_model_dir(out_dir, config, state, backbone, overwrite=overwrite, probe=self._probe_record())

    @torch.inference_mode()
    def _probe_record(self) -> dict[str, Any]:
        """Scores and maps on the probe images (:mod:`spotdiff.detect.probe`), stored with the model so
        that an ONNX export is checked against it without torch. On a CPU model, ``predict``; elsewhere a
        CPU copy of the head (what the exported graph runs; no TF32 or other device arithmetic)."""
        assert self.image_size_ is not None
        images = torch.from_numpy(probe_images(self.image_size_))
        if self.device_.type == "cpu":
            scores, maps = self.predict(images)
        else:
            scores, maps = self.head(traceable=True)(normalize(images))
        return probe_record(scores.numpy(), maps.numpy())

    @classmethod
    def _from_config(cls, config: dict[str, Any], device: str | torch.device) -> Self:
        raise NotImplementedError

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> Self:
        """Read a model directory written by ``save``; hashes and format version are verified.

        Called on :class:`Detector` it returns whichever detector the directory holds.
        """
        config, tensors, backbone_state = store.load_model_dir(model_dir)
        schema.check_model_tensors(config, tensors, backbone_state, str(model_dir))
        kind = config.get("model")
        from spotdiff.detect import DETECTORS

        if kind not in DETECTORS:
            raise WeightsError(f"{model_dir}: unknown model type {kind!r}")
        target = DETECTORS[kind]
        if cls is not Detector and not issubclass(target, cls):
            raise WeightsError(f"{model_dir}: holds a {kind} model, not {cls.__name__}")
        try:
            model = target._from_config(config, device)
            model._build_backbone(None)  # random init, replaced by the saved feature network
            load_feature_weights(model.backbone_, backbone_state, source=f"{model_dir}/{store.BACKBONE_FILE}")
            model.image_size_ = (int(config["image_size"][0]), int(config["image_size"][1]))
            model.n_train_ = int(config["n_train"])
            model.backbone_source_ = str(config["backbone_source"])
            model.weights_record_ = dict(
                config.get("weights")
                or file_record(  # saved before records existed
                    None if model.backbone_source_.startswith("random init") else model.backbone_source_
                )
            )
            model.data_source_ = dict(config.get("data_source") or {})
            model._normal_maps = dict(config["normal_maps"]) if config.get("normal_maps") else None
            model.calibration_ = config.get("calibration")
            model._set_state(tensors)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, WeightsError):
                raise
            raise WeightsError(f"{model_dir}: inconsistent model files ({type(exc).__name__}: {exc})") from exc
        return cast(Self, model)  # target is cls or a subclass of it (checked above)
