"""The pre-training method interface and the SPD loss.

A :class:`PretrainMethod` owns a torchvision ResNet ``backbone`` (``fc = Identity``; its state_dict
keys are torchvision's, so ``export-backbone`` can save it as is), the method's heads and losses,
its per-sample view pipeline and its paper's ImageNet ResNet-50 :class:`Recipe`.

SPD (Zou et al., ECCV 2022) adds to any base loss::

    L = L_base + eta * L_SPD,    L_SPD = mean[cos(z, z_neg) - cos(z, z_pos)]

with ``z`` the normalised projection of the anchor (here: the base method's first view, whose
projection the base loss already computes), ``z_pos`` that of a weak global augmentation of the
image and ``z_neg`` that of SmoothBlend applied to another weak global augmentation. Positive and
negative go through the backbone and head in ONE extra forward pass of ``2 B`` images; gradients
flow through anchor, positive and negative. Supervised pre-training replaces ``L_SPD`` with a binary
"is this input SmoothBlended?" cross-entropy (see :mod:`spotdiff.pretrain.supervised`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet
from torchvision.models.resnet import BasicBlock, Bottleneck

from spotdiff.augment.smoothblend import SmoothBlend
from spotdiff.augment.views import MultiViewTransform, ViewFn, weak_augmentation
from spotdiff.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from spotdiff.errors import ConfigError

SPD_VIEWS = ("spd_pos", "spd_neg")
# Hyper-parameters of SmoothBlend accepted by every method (``build_method(..., blend_area=...)``).
BLEND_HPARAMS: dict[str, Any] = {
    "blend_area": (0.005, 0.01),
    "blend_aspect": (0.3, 3.3),
    "blend_sigma": 0.08,
    "blend_jitter": (0.4, 0.4, 0.4, 0.1),
}


@dataclass
class Recipe:
    """Per-method defaults of the original paper (ImageNet, ResNet-50).

    ``base_lr`` is per 256 images: the loop uses ``lr = base_lr * batch / 256``.
    """

    optimizer: str  # "sgd" or "lars"
    base_lr: float
    weight_decay: float
    momentum: float
    batch_size: int
    epochs: int
    warmup_epochs: float  # the config accepts fractional epochs (warm-up steps are rounded)


def spd_loss(z: torch.Tensor, z_pos: torch.Tensor, z_neg: torch.Tensor) -> torch.Tensor:
    """``mean[cos(z, z_neg) - cos(z, z_pos)]`` over the batch; inputs ``(B, D)``, normalised or not.

    In [-2, 2]; minimising it pulls the anchor towards the positive and pushes it from the negative.
    """
    return (F.cosine_similarity(z, z_neg, dim=1) - F.cosine_similarity(z, z_pos, dim=1)).mean()


# ----------------------------------------------------------------------------- distributed helpers
def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this rank's slice of the summed gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        rank, world = world_info()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (rank * x.shape[0], (rank + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad)  # every rank's loss depends on every rank's rows
        return grad[ctx.rows[0] : ctx.rows[1]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from every rank along dim 0, with gradient.

    Backward: the gradient of the sum of all ranks' losses with respect to the local rows; DDP's
    gradient averaging then yields the gradient of the mean loss. Identity with one process.
    """
    if world_info()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, without gradient (identity if 1 rank)."""
    world = world_info()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def zero_init_residual(backbone: ResNet) -> None:
    """Zero the last BN scale of every residual block (torchvision's ``zero_init_residual=True``).

    Each block then starts as the identity; applied after the usual random initialisation, so it
    draws no random numbers.
    """
    for block in backbone.modules():
        if isinstance(block, Bottleneck):
            block.bn3.weight.zero_()
        elif isinstance(block, BasicBlock):
            block.bn2.weight.zero_()


# ----------------------------------------------------------------------------- the method interface
class PretrainMethod(nn.Module):
    """Base class of the pre-training methods (SimSiam, MoCo v2, SimCLR, supervised), SPD optional.

    Subclasses set ``name``, ``base_view_names``, ``default_recipe``, ``hparam_defaults`` and implement
    :meth:`base_views`, :meth:`base_loss` and (SSL methods) :meth:`embed`.

    Optimiser param groups (:meth:`param_groups`) carry, besides ``params``/``lr``/``weight_decay``:
    ``name``; ``fixed_lr`` (True: the schedule must keep this group's lr constant, SimSiam's
    predictor); ``lars_exclude`` (True: no LARS trust-ratio scaling, biases and norm layers).
    The optimiser itself (SGD or LARS per ``recipe.optimizer``) is built by the training loop
    (``spotdiff.pretrain.optim.build_optimizer``).
    """

    name: ClassVar[str] = ""
    base_view_names: ClassVar[tuple[str, ...]] = ()  # the keys of base_views()
    default_recipe: ClassVar[Recipe]
    hparam_defaults: ClassVar[dict[str, Any]] = {}
    # True: biases and norm-layer parameters get no weight decay (and no LARS adaptation).
    exclude_norm_and_bias_from_wd: ClassVar[bool] = False
    # Parameter-name prefixes whose lr stays constant during the schedule.
    fixed_lr_prefixes: ClassVar[tuple[str, ...]] = ()
    # True: under DDP on GPU the loop converts every BN layer to SyncBatchNorm (MoCo: False).
    sync_batchnorm: ClassVar[bool] = True
    # True: a randomly initialised backbone starts with zero_init_residual (SimSiam's reference).
    zero_init_residual: ClassVar[bool] = False

    def __init__(
        self,
        backbone: ResNet,
        spd: bool = False,
        eta: float = 0.1,
        blend_area: Any = BLEND_HPARAMS["blend_area"],
        blend_aspect: Any = BLEND_HPARAMS["blend_aspect"],
        blend_sigma: float = BLEND_HPARAMS["blend_sigma"],
        blend_jitter: Any = BLEND_HPARAMS["blend_jitter"],
    ) -> None:
        super().__init__()
        if not isinstance(backbone.fc, nn.Identity):
            self.feature_dim = int(backbone.fc.in_features)
            backbone.fc = nn.Identity()
        else:
            # fc already removed: the last block's input width equals the feature width
            self.feature_dim = int(backbone.layer4[-1].conv1.in_channels)
        if not (math.isfinite(eta) and eta >= 0):
            raise ConfigError(f"eta={eta!r}: the SPD weight must be a finite number >= 0")
        self.backbone = backbone
        self.spd = bool(spd)
        self.eta = float(eta)
        self.recipe = replace(self.default_recipe)
        self.smoothblend = (
            SmoothBlend(
                area=blend_area,
                aspect=blend_aspect,
                sigma=blend_sigma,
                jitter=blend_jitter,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
            )
            if self.spd
            else None
        )

    # -- to implement
    def base_views(self, image_size: int) -> dict[str, ViewFn]:
        """The base method's per-sample pipelines ``{name: image -> (3, S, S) in [0, 1]}``."""
        raise NotImplementedError

    def base_loss(
        self, views: Mapping[str, torch.Tensor], labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(L_base, z_anchor)``: the base loss and the anchor's projection reused by SPD (or None)."""
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` normalised images -> ``(N, D)`` L2-normalised projections (SPD's ``z``)."""
        raise NotImplementedError

    def spd_objective(
        self, z_anchor: torch.Tensor | None, positive: torch.Tensor, negative: torch.Tensor
    ) -> torch.Tensor:
        """SPD loss from the anchor projection and the positive / blended negative images."""
        if z_anchor is None:
            raise ValueError(f"{self.name}: base_loss gave no anchor projection, which SPD needs")
        z = self.embed(torch.cat([positive, negative], dim=0))
        z_pos, z_neg = z.chunk(2, dim=0)
        return spd_loss(z_anchor, z_pos, z_neg)

    # -- the interface used by the training loop
    def view_transform(self, image_size: int) -> Callable[[Any], dict[str, torch.Tensor]]:
        """Per-sample CPU transform: image -> every view this method needs, normalised ``(3, S, S)``.

        With SPD, ``spd_pos`` and ``spd_neg`` are two independent weak global augmentations;
        SmoothBlend is applied to ``spd_neg`` later, batched, in :meth:`forward`.
        """
        views = self.base_views(image_size)
        if self.spd:
            weak = weak_augmentation(image_size)
            views.update({"spd_pos": weak, "spd_neg": weak})
        return MultiViewTransform(views)

    def required_views(self) -> tuple[str, ...]:
        """Names of the views :meth:`forward` reads, in the order :meth:`view_transform` makes them."""
        return self.base_view_names + (SPD_VIEWS if self.spd else ())

    def forward(
        self,
        views: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses of one batch: ``{"loss", "loss_base", "loss_spd"}`` (``loss_spd`` is 0 without SPD).

        ``views`` are ``(B, 3, S, S)`` normalised batches; SmoothBlend of ``spd_neg`` draws its
        random parameters from ``generator``.
        """
        missing = [v for v in self.required_views() if v not in views]
        if missing:
            raise ValueError(f"{self.name}: missing views {missing} (got {sorted(views)})")
        loss_base, z_anchor = self.base_loss(views, labels)
        if not self.spd:
            return {"loss": loss_base, "loss_base": loss_base, "loss_spd": loss_base.new_zeros(())}
        assert self.smoothblend is not None  # built whenever self.spd
        negative = self.smoothblend(views["spd_neg"], generator=generator)
        loss_spd = self.spd_objective(z_anchor, views["spd_pos"], negative)
        return {"loss": loss_base + self.eta * loss_spd, "loss_base": loss_base, "loss_spd": loss_spd}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser param groups at base ``lr``: weight decay per the recipe, fixed-lr groups marked."""
        buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for pname, p in self.named_parameters():
            if not p.requires_grad:
                continue
            fixed = pname.startswith(self.fixed_lr_prefixes) if self.fixed_lr_prefixes else False
            no_decay = self.exclude_norm_and_bias_from_wd and p.ndim <= 1
            buckets.setdefault((fixed, no_decay), []).append(p)
        groups = []
        for (fixed, no_decay), params in sorted(buckets.items()):
            groups.append(
                {
                    "name": ("fixed_lr" if fixed else "main") + ("_no_decay" if no_decay else ""),
                    "params": params,
                    "lr": lr,
                    "weight_decay": 0.0 if no_decay else self.recipe.weight_decay,
                    "fixed_lr": fixed,
                    "lars_exclude": no_decay,
                }
            )
        return groups

    def check_image_size(self, image_size: int) -> None:
        """ConfigError when SmoothBlend cannot hold its stated area and smoothness on ``image_size`` views."""
        if self.smoothblend is not None:
            self.smoothblend.check_size(image_size, image_size)

    def check_batches(self, images_per_epoch: int, batch_size: int, world_size: int) -> None:
        """Called by the loop before training: ConfigError if the data cannot feed this method. No-op here."""

    def after_step(self) -> None:
        """Called by the loop after every optimiser step (MoCo: momentum update). No-op here."""
