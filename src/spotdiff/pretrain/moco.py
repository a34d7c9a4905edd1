"""MoCo v2 (Chen et al. 2020): momentum key encoder, queue of negatives, InfoNCE, MLP head, shuffling BN.

Shuffling BN (MoCo, He et al. 2020, section 3.3): batch normalisation lets the samples of a batch
communicate, so a query and its positive key normalised with the same batch statistics leak the
answer. The key batch is therefore normalised on other samples than the query's:

* **under DDP** (as the reference): every process runs its own (not synchronised) BN; the keys' images
  of all processes are gathered, permuted with one random permutation (drawn by rank 0, broadcast),
  each process encodes its slice of the permuted batch, and the keys are gathered and put back in order;
* **on one process** (our emulation of ``shuffle_groups`` devices): the query batch is encoded in
  ``shuffle_groups`` contiguous sub-batches and the key batch in as many sub-batches of a random
  permutation, each sub-batch with its own BN statistics, then the keys are put back in order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet

from spotdiff.augment.views import ViewFn, ssl_augmentation
from spotdiff.errors import ConfigError
from spotdiff.pretrain.base import PretrainMethod, Recipe, gather_no_grad, world_info


def mlp_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's 2-layer MLP head ``in -> hidden -> ReLU -> out``."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class MoCo(PretrainMethod):
    """MoCo v2: ``q`` from view1 (query encoder), ``k`` from view2 (momentum encoder, no gradient),

    ``L = CE([q.k, q.queue] / T, 0)``; keys are enqueued (gathered from every rank under DDP) after
    the loss. The SPD anchor is ``q`` and positives/negatives use the query encoder.
    BN: shuffling BN (module docstring); ``sync_batchnorm = False`` keeps the loop from converting
    the BN layers to SyncBatchNorm, which would give the key the query's statistics again.
    """

    name = "moco"
    base_view_names = ("view1", "view2")
    default_recipe = Recipe(
        optimizer="sgd", base_lr=0.03, weight_decay=1e-4, momentum=0.9, batch_size=256, epochs=200, warmup_epochs=0
    )
    hparam_defaults: ClassVar[dict[str, Any]] = {
        "dim": 128,
        "hidden_dim": None,
        "queue_size": 65536,
        "key_momentum": 0.999,
        "temperature": 0.2,
        "shuffle_groups": 4,
    }
    sync_batchnorm = False

    def __init__(
        self,
        backbone: ResNet,
        dim: int = 128,
        hidden_dim: int | None = None,
        queue_size: int = 65536,
        key_momentum: float = 0.999,
        temperature: float = 0.2,
        shuffle_groups: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        if not (isinstance(queue_size, int) and queue_size >= 1):
            raise ConfigError(f"moco: queue_size={queue_size!r}: need an integer >= 1")
        if not (isinstance(shuffle_groups, int) and shuffle_groups >= 2):
            raise ConfigError(
                f"moco: shuffle_groups={shuffle_groups!r}: need an integer >= 2 "
                "(sub-batches with their own BN statistics on one process)"
            )
        self.shuffle_groups = shuffle_groups
        self.head = mlp_head(self.feature_dim, hidden_dim or self.feature_dim, dim)
        self.key_backbone = copy.deepcopy(self.backbone)
        self.key_head = copy.deepcopy(self.head)
        for p in (*self.key_backbone.parameters(), *self.key_head.parameters()):
            p.requires_grad_(False)
        self.key_momentum = float(key_momentum)
        self.temperature = float(temperature)
        self.queue: torch.Tensor  # (queue_size, dim) unit-norm keys, a buffer
        self.queue_ptr: torch.Tensor  # () long, the next slot to overwrite, a buffer
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def base_views(self, image_size: int) -> dict[str, ViewFn]:
        strong = ssl_augmentation(image_size)
        return {"view1": strong, "view2": strong}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)

    def check_batches(self, images_per_epoch: int, batch_size: int, world_size: int) -> None:
        """Refuse a queue that must hold keys of the current batch, or sub-batches too small for BN.

        The queue plus the current batch must fit in one epoch's images; otherwise every step
        compares queries with keys of their own images as negatives.
        """
        largest = images_per_epoch - batch_size
        if self.queue.shape[0] > largest:
            raise ConfigError(
                f"moco: queue_size={self.queue.shape[0]} is larger than the data allows: need 1 <= "
                f"queue_size <= {largest} (images per epoch {images_per_epoch} - batch {batch_size})"
            )
        local = batch_size // world_size
        if world_size == 1 and local < 2 * self.shuffle_groups:
            raise ConfigError(
                f"moco: batch {local} is too small for shuffle_groups={self.shuffle_groups}: need "
                f"batch >= {2 * self.shuffle_groups} (2 images per BN sub-batch); lower hparams.shuffle_groups"
            )

    def _encode_queries(self, images: torch.Tensor) -> torch.Tensor:
        """``q`` of ``(B, ...)`` view-1 images; on one process in ``shuffle_groups`` BN sub-batches."""
        if world_info()[1] > 1:
            return self.embed(images)
        return torch.cat([self.embed(part) for part in images.tensor_split(self.shuffle_groups)])

    @torch.no_grad()
    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        """``k`` of ``(B, ...)`` view-2 images, in their order, encoded in shuffled BN sub-batches."""

        def encode(x: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.key_head(self.key_backbone(x)), dim=1)

        rank, world = world_info()
        if world == 1:
            return shuffled_in_groups(encode, images, self.shuffle_groups)
        return shuffled_across_ranks(encode, images, rank, world)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        keys = gather_no_grad(keys)
        size = self.queue.shape[0]
        keys = keys[-size:]
        index = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def base_loss(
        self, views: Mapping[str, torch.Tensor], labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._encode_queries(views["view1"])
        k = self._keys(views["view2"])
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ self.queue.clone().detach().to(q.dtype).t()
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        if self.training:
            self._enqueue(k)
        return loss, q

    @torch.no_grad()
    def after_step(self) -> None:
        """Momentum update of the key encoder: ``k = m * k + (1 - m) * q`` (parameters only)."""
        m = self.key_momentum
        for query, key in ((self.backbone, self.key_backbone), (self.head, self.key_head)):
            q_params = list(query.parameters())
            k_params = list(key.parameters())
            torch._foreach_mul_(k_params, m)
            torch._foreach_add_(k_params, q_params, alpha=1.0 - m)


Encoder = Callable[[torch.Tensor], torch.Tensor]


def shuffled_in_groups(encode: Encoder, images: torch.Tensor, groups: int) -> torch.Tensor:
    """``encode`` a random permutation of ``images`` in ``groups`` sub-batches; rows back in input order.

    The permutation comes from the global torch RNG (seeded per step by the training loop).
    """
    perm = torch.randperm(images.shape[0], device=images.device)
    encoded = torch.cat([encode(images[part]) for part in perm.tensor_split(groups)])
    out = torch.empty_like(encoded)
    out[perm] = encoded
    return out


def shuffled_across_ranks(encode: Encoder, images: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """DDP: ``encode`` this rank's slice of a random permutation of every rank's ``images``.

    All ranks' images are gathered, permuted by rank 0's permutation (broadcast), each rank encodes
    its ``B`` rows of it, the results are gathered again and this rank's own rows returned in order.
    """
    everything = gather_no_grad(images)
    perm = torch.randperm(everything.shape[0], device=images.device)
    dist.broadcast(perm, src=0)
    mine = perm.view(world, -1)[rank]
    encoded = gather_no_grad(encode(everything[mine]))  # row j is the image perm[j]
    out = torch.empty_like(encoded)
    out[perm] = encoded
    return out.view(world, -1, *out.shape[1:])[rank]
