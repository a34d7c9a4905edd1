"""PaDiM (Defard et al., 2021): one multivariate Gaussian per feature position.

Fitting streams over the training set: per position only running sums are kept (see
:class:`GaussianAccumulator`; float32 sums of shifted samples for float32 features), so memory
does not grow with the number of images. The covariance of position ``p`` is the unbiased
estimate (divisor ``N - 1``) plus ``epsilon * I``; it is stored as the inverse of its Cholesky
factor ``L`` (``Sigma = L L^T``) so that the Mahalanobis distance is ``||L^-1 (x - mu)||``, one
batched matrix product over all positions. ``L^-1`` is kept packed (its lower triangle, the
``torch.tril_indices`` order) in memory as on disk, and unpacked a few positions at a time.

Anomaly map: Mahalanobis distance on the ``layers[0]`` grid, bilinearly upsampled to the image
size, smoothed with a Gaussian of sigma 4 px. Image score: maximum of the map. Both are computed by
the fitted head, :class:`spotdiff.detect.padim_head.PaDiMHead` (:meth:`PaDiM.head`), which
``predict`` and ``export`` run.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any, Self

import torch

from spotdiff.data.loader import ItemDataset
from spotdiff.detect.base import Detector
from spotdiff.detect.features import padim_embedding
from spotdiff.detect.gaussian import GaussianAccumulator, unpack_lower
from spotdiff.detect.memory import check_memory_fits
from spotdiff.detect.padim_head import PaDiMHead
from spotdiff.errors import ConfigError, DataError, WeightsError
from spotdiff.models import WeightsLike, layer_channels

log = logging.getLogger(__name__)

DEFAULT_DIMS = {"resnet18": 100, "resnet50": 550, "wide_resnet50_2": 550}
"""Random channel subset size per backbone, as in the PaDiM paper."""

UNPACKED_FACTOR_BYTES = 1 << 30
"""``predict`` keeps an unpacked ``(P, d, d)`` copy of ``L^-1`` when it is at most this large
(resnet18, d = 100, 256 px: 164 MB), which makes the Mahalanobis step faster (benchmarks/RESULTS.md); larger
factors (resnet50, d = 550: 5 GB) are unpacked a few positions at a time instead."""


def channel_subset(arch: str, layers: Sequence[str], d: int | None, seed: int) -> tuple[int, torch.Tensor]:
    """``(d_, index)``: ``d`` (None: ``DEFAULT_DIMS[arch]``) capped at the channel count of ``layers``, and
    the sorted random subset of that many concatenated channels drawn from ``seed``."""
    total = sum(layer_channels(arch, layers))
    d_ = min(DEFAULT_DIMS[arch] if d is None else d, total)
    generator = torch.Generator().manual_seed(seed)
    return d_, torch.randperm(total, generator=generator)[:d_].sort().values


class PaDiM(Detector):
    """PaDiM anomaly detector.

    Args:
        arch: ``resnet18``, ``resnet50`` or ``wide_resnet50_2``.
        weights: backbone weights: ``"imagenet"``, a torchvision weights name, a ``.pth`` or
            ``.safetensors`` file (see :func:`spotdiff.models.load_weights`), or None / ``"random"``
            for a random init drawn from ``seed``.
        layers: backbone stages, shallow to deep; the map lives on the first one's grid.
        d: number of channels kept (random subset drawn from ``seed``); default per ``arch``
            (100 for resnet18, 550 otherwise); capped at the total channel count.
        epsilon: covariance regulariser ``epsilon * I``.
        batch_size: images per loader batch and backbone forward pass (on CPU at most
            ``CPU_FORWARD_IMAGES`` = 4, which is as fast and bounds memory); num_workers: image-decoding
            threads (None: one per spare core, see :func:`spotdiff.data.loader.decode_workers`);
            device: where features are computed.
    """

    model_type = "padim"

    def __init__(
        self,
        arch: str = "resnet18",
        weights: WeightsLike = None,
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        d: int | None = None,
        epsilon: float = 0.01,
        seed: int = 0,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        num_workers: int | None = None,
    ) -> None:
        super().__init__(arch, weights, layers, seed, batch_size, device, num_workers)
        self.d = d
        self.epsilon = epsilon

    def check_params(self) -> Self:
        super().check_params()
        if self.d is not None and self.d < 1:
            raise ConfigError(f"d must be >= 1, got {self.d}")
        if self.epsilon <= 0:
            raise ConfigError(f"epsilon must be > 0, got {self.epsilon}")
        return self

    def _build_backbone(self, weights: WeightsLike) -> None:
        """Also draws the channel subset: ``d_`` (``d`` capped at the channel count) and ``channel_index_``."""
        super()._build_backbone(weights)
        self.d_, self.channel_index_ = channel_subset(self.arch, self.layers_, self.d, self.seed)
        self.mean_: torch.Tensor | None = None
        self.inv_chol_packed_: torch.Tensor | None = None
        """``(P, d (d + 1) / 2)`` float32 lower triangle of ``L^-1`` (``torch.tril_indices`` order);
        see :attr:`inv_chol_` for the square form."""
        self._unpacked: tuple[torch.Tensor, torch.Tensor] | None = None  # (packed, its unpacked copy)
        self._head: PaDiMHead | None = None  # the eager head, kept while its factor is current
        self._grid: tuple[int, int] = (0, 0)  # (h, w) of the last embedding

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, P, d)`` patch embeddings of normalised images, ``P = h * w``."""
        emb = padim_embedding(self.backbone_, images, self.layers_, self.channel_index_, self.arch)
        self._grid = (emb.shape[-2], emb.shape[-1])
        return emb.flatten(2).transpose(1, 2)

    @property
    def inv_chol_(self) -> torch.Tensor | None:
        """``(P, d, d)`` float32 ``L^-1``, unpacked from :attr:`inv_chol_packed_` on each access
        (``P * d^2`` floats: at d = 550 on a 64 x 64 grid, 5 GB; prediction never calls it)."""
        return None if self.inv_chol_packed_ is None else unpack_lower(self.inv_chol_packed_, self.d_)

    @torch.inference_mode()
    def fit(self, dataset: ItemDataset) -> Self:
        """Estimate the per-position Gaussians from normal images (streaming float32 sums, float64 factorisation).

        Before the sums are allocated their size is checked against the available memory
        (:func:`spotdiff.detect.memory.check_memory_fits`).
        """
        self._start_fit()
        acc: GaussianAccumulator | None = None
        n_images = len(dataset)
        for images in self._training_batches(dataset, desc="PaDiM features"):
            emb = self._embed(images)
            if acc is None:
                self._check_training_size(n_images, emb.shape[1])
                acc = GaussianAccumulator(emb.shape[1], emb.shape[2])
            acc.update(emb)
        assert acc is not None
        if acc.count < 2:
            raise DataError(f"PaDiM needs at least 2 training images, got {acc.count}")
        self.mean_ = acc.mean().to(torch.float32).to(self.device_)
        self.inv_chol_packed_ = acc.inverse_cholesky_packed(self.epsilon).to(self.device_)
        self._check_fitted("mean", self.mean_)
        self._check_fitted("inverse Cholesky factors", self.inv_chol_packed_)
        return self

    def _check_training_size(self, n_images: int, positions: int) -> None:
        """Refuse statistics that would not fit in memory; warn when ``N - 1 < d``."""
        grid = f"{self._grid[0]}x{self._grid[1]}"
        check_memory_fits(
            GaussianAccumulator.nbytes(positions, self.d_),
            f"PaDiM statistics (d={self.d_}, {grid} positions, {positions} x d(d+1)/2 float32)",
            "a smaller --d or --image-size",
        )
        if 2 <= n_images <= self.d_:
            log.warning(
                f"warning: PaDiM: {n_images} training images give a sample covariance of rank at most "
                f"{n_images - 1} < d = {self.d_}; it is invertible only through the regulariser "
                f"epsilon * I = {self.epsilon:g} * I. Use at least {self.d_ + 1} images or a smaller --d."
            )

    def head(self, traceable: bool = False) -> PaDiMHead:
        """The fitted head (:class:`~spotdiff.detect.padim_head.PaDiMHead`).

        Eager (``predict``): the model's own tensors on ``device_``, with ``L^-1`` unpacked once and
        kept when at most ``UNPACKED_FACTOR_BYTES``, else packed (unpacked a few positions at a time).
        ``traceable`` (``export``): a CPU float32 copy of the backbone and tensors, ``L^-1`` square;
        the model is not changed.
        """
        if self.mean_ is None or self.inv_chol_packed_ is None or self.image_size_ is None:
            raise ConfigError("PaDiM is not fitted; call fit() or load() first")
        if traceable:
            square = unpack_lower(self.inv_chol_packed_.detach().to("cpu", torch.float32), self.d_)
            return PaDiMHead(
                copy.deepcopy(self.backbone_).cpu(),
                self.arch,
                self.layers_,
                self.image_size_,
                self.channel_index_.cpu().clone(),
                self.mean_.detach().to("cpu", torch.float32, copy=True),
                square,
                traceable=True,
            ).eval()
        factor = self.inv_chol_packed_
        if self.mean_.shape[0] * self.d_**2 * 4 <= UNPACKED_FACTOR_BYTES:
            if self._unpacked is None or self._unpacked[0] is not factor:
                self._unpacked = (factor, unpack_lower(factor, self.d_))
            factor = self._unpacked[1]
        head = self._head
        if (
            head is None
            or head.inv_chol is not factor
            or head.mean is not self.mean_
            or head.backbone is not self.backbone_
        ):
            head = PaDiMHead(
                self.backbone_, self.arch, self.layers_, self.image_size_, self.channel_index_, self.mean_, factor
            )
            self._head = head
        self._grid = head.grid
        return head

    def _config(self) -> dict[str, Any]:
        return {"d": self.d_, "epsilon": float(self.epsilon)}

    def _state(self) -> dict[str, torch.Tensor]:
        """The lower-triangular ``L^-1`` is saved packed, as held in memory (exact: its upper triangle is 0)."""
        assert self.mean_ is not None and self.inv_chol_packed_ is not None
        return {"mean": self.mean_, "inv_cholesky_packed": self.inv_chol_packed_, "channel_index": self.channel_index_}

    @classmethod
    def _from_config(cls, config: dict[str, Any], device: str | torch.device) -> Self:
        return cls(
            arch=config["arch"],
            layers=config["layers"],
            d=int(config["d"]),
            epsilon=float(config["epsilon"]),
            seed=int(config["seed"]),
            device=device,
        )

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            mean, packed, index = tensors["mean"], tensors["inv_cholesky_packed"], tensors["channel_index"]
        except KeyError as exc:
            raise WeightsError(f"PaDiM model file lacks tensor {exc.args[0]!r}") from exc
        if mean.ndim != 2:
            raise WeightsError("PaDiM model tensors have inconsistent shapes")
        p, d = mean.shape
        if packed.shape != (p, d * (d + 1) // 2) or index.shape != (d,) or d != self.d_:
            raise WeightsError("PaDiM model tensors have inconsistent shapes")
        self.channel_index_ = index.to(torch.int64)
        self.mean_ = mean.to(self.device_, torch.float32)
        self.inv_chol_packed_ = packed.to(self.device_, torch.float32).contiguous()
