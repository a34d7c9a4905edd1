"""A tiny stand-in pre-training method for the training-loop tests (test code only).

It follows the ``PretrainMethod`` interface: a real torchvision ResNet backbone (fc = Identity),
two random-crop views, a SimSiam-style loss, and a generator-driven "SPD" term so the loop's
per-step generator matters. Hyper-parameters for the tests:
    nan_at_step: forward call number (1-based, counted in a saved buffer) that returns NaN;
    sleep: seconds to sleep per forward (lets a test kill the run mid-way).

Run as a script it is ``spotdiff`` with this method installed: ``python tests/_toy_method.py pretrain ...``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from spotdiff.models import build_backbone


@dataclass
class ToyRecipe:
    optimizer: str = "sgd"
    base_lr: float = 0.05
    weight_decay: float = 1e-4
    momentum: float = 0.9
    batch_size: int = 4
    epochs: int = 2
    warmup_epochs: float = 1


class ToyMethod(nn.Module):
    def __init__(
        self,
        name="simsiam",
        arch="resnet18",
        spd=False,
        eta=0.1,
        num_classes=None,
        weights=None,
        nan_at_step=0,
        sleep=0.0,
        optimizer="sgd",
    ):
        super().__init__()
        self.name = name
        self.backbone = build_backbone(arch, weights=weights)
        dim = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.projector = nn.Linear(dim, 16)
        self.spd, self.eta = spd, eta
        self.recipe = ToyRecipe(optimizer=optimizer)
        self.nan_at_step = nan_at_step
        self.sleep = sleep
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.after_steps = 0

    def view_transform(self, image_size):
        aug = v2.Compose(
            [
                v2.PILToTensor(),
                v2.RandomResizedCrop(image_size, scale=(0.3, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )
        return lambda img: {"view1": aug(img), "view2": aug(img)}

    def forward(self, views, labels=None, generator=None):
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        z1 = self.projector(self.backbone(views["view1"]))
        z2 = self.projector(self.backbone(views["view2"]))
        loss_base = -F.cosine_similarity(z1, z2.detach(), dim=1).mean()
        noise = torch.rand(views["view1"].shape, generator=generator, device=views["view1"].device)
        loss_spd = self.projector(self.backbone(views["view1"] * noise)).pow(2).mean() if self.spd else loss_base * 0
        loss = loss_base + self.eta * loss_spd
        if self.nan_at_step and int(self.calls) == self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss, "loss_base": loss_base, "loss_spd": loss_spd}

    def param_groups(self, lr):
        wd = self.recipe.weight_decay
        return [
            {"params": list(self.backbone.parameters()), "lr": lr, "weight_decay": wd},
            {"params": list(self.projector.parameters()), "lr": lr, "weight_decay": wd, "fixed_lr": True},
        ]

    sync_batchnorm = True

    def check_image_size(self, image_size):  # no SmoothBlend here
        pass

    def check_batches(self, images_per_epoch, batch_size, world_size):
        pass

    def after_step(self):
        self.after_steps += 1


def build_toy_method(name, arch="resnet18", spd=False, eta=0.1, num_classes=None, weights=None, **hparams):
    return ToyMethod(name, arch, spd, eta, num_classes, weights, **hparams)


def make_images(folder: Path, n: int = 12, size: int = 40, classes: tuple[str, ...] = (), seed: int = 0) -> Path:
    """Write ``n`` random RGB PNGs into ``folder`` (spread over class subfolders when given)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / classes[i % len(classes)] if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"img_{i:03d}.png")
    return folder


def install() -> None:
    """Make the training loop build the toy method (for subprocesses; tests use monkeypatch)."""
    import spotdiff.pretrain.train as train

    train.build_method = build_toy_method


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    install()
    from spotdiff.cli import main

    sys.exit(main(sys.argv[1:]))
