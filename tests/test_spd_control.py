"""SPD changes only the loss: the eta = 0 control runs the complete SPD path with a zero SPD gradient.

* The base method's views are identical with and without SPD, batch by batch, and SPD's own random
  draws (its weak views, SmoothBlend) never shift the base method's random numbers.
* An eta = 0 run and an eta = 0.1 run differ only through the SPD gradient: after their first step
  their BatchNorm buffers are equal (same passes, same images) while the weights differ; and the
  eta = 0 run's weights equal plain SimSiam's (a zero SPD gradient) while its BN buffers do not (the
  extra passes): the control is what the experiment needs.
"""

from __future__ import annotations

from pathlib import Path

import _toy_method
import pytest
import torch
from torch.utils.data import DataLoader

from spotdiff.pretrain.checkpoint import load_checkpoint
from spotdiff.pretrain.config import load_config
from spotdiff.pretrain.data import EpochBatchSampler, PretrainImages, find_images
from spotdiff.pretrain.methods import build_method
from spotdiff.pretrain.train import run_pretrain

SIZE = 72  # SmoothBlend holds its stated area and smoothness from 65 px with aspect 0.5-2
SMALL = {"proj_dim": 32, "pred_dim": 16, "blend_aspect": (0.5, 2.0)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return _toy_method.make_images(tmp_path_factory.mktemp("spd_control") / "images", n=8, size=SIZE)


def _batches(method, images: Path, epochs: int = 2) -> list[dict[str, torch.Tensor]]:
    paths, labels, _ = find_images(images)
    dataset = PretrainImages(paths, labels, method.view_transform(SIZE), seed=3)
    sampler = EpochBatchSampler(len(paths), 4, seed=3)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out += [views for views, _ in DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=0)]
    return out


def test_base_views_are_identical_with_and_without_spd_batch_by_batch(images):
    torch.manual_seed(0)
    plain = build_method("simsiam", arch="resnet18", spd=False, **SMALL)
    torch.manual_seed(0)
    spd = build_method("simsiam", arch="resnet18", spd=True, eta=0.1, **SMALL)
    without, with_spd = _batches(plain, images), _batches(spd, images)
    assert len(without) == len(with_spd) == 4
    for a, b in zip(without, with_spd):
        assert set(b) == {"view1", "view2", "spd_pos", "spd_neg"}
        for name in ("view1", "view2"):
            assert torch.equal(a[name], b[name])
        assert not torch.equal(b["spd_pos"], b["spd_neg"])  # two independent weak views


def test_smoothblend_and_spd_forward_never_draw_from_the_global_rng(images):
    torch.manual_seed(0)
    spd = build_method("simsiam", arch="resnet18", spd=True, eta=0.1, **SMALL)
    torch.manual_seed(0)
    plain = build_method("simsiam", arch="resnet18", spd=False, **SMALL)
    views = _batches(spd, images, epochs=1)[0]
    after = []
    for method in (plain, spd):
        torch.manual_seed(123)
        out = method(views, generator=torch.Generator().manual_seed(7))
        after.append(torch.rand(4))
        assert torch.isfinite(out["loss"])
    assert torch.equal(after[0], after[1])


def _first_step(images: Path, out: Path, spd: bool, eta: float) -> dict[str, torch.Tensor]:
    cfg = load_config(
        None,
        dict(
            method="simsiam",
            spd=spd,
            eta=eta,
            arch="resnet18",
            data=str(images),
            out=str(out),
            steps=1,
            batch_size=4,
            image_size=SIZE,
            workers=0,
            seed=5,
            checkpoint_every=0,
            log_every=1,
            tensorboard=False,
            hparams=SMALL,
        ),
    )
    return load_checkpoint(run_pretrain(cfg))["model"]


def test_eta_zero_differs_from_eta_point_one_only_through_the_spd_gradient(images, tmp_path):
    eta0 = _first_step(images, tmp_path / "eta0", spd=True, eta=0.0)
    eta1 = _first_step(images, tmp_path / "eta01", spd=True, eta=0.1)
    plain = _first_step(images, tmp_path / "plain", spd=False, eta=0.1)
    buffers = [k for k in eta0 if "running_" in k or "num_batches_tracked" in k]
    weights = [k for k in eta0 if k.startswith("backbone.") and k.endswith("conv1.weight")]
    assert buffers and weights
    # same passes over the same images: the first step's BN buffers are equal
    assert all(torch.equal(eta0[k], eta1[k]) for k in buffers)
    # the SPD gradient moved the eta = 0.1 weights, not the eta = 0 ones
    assert any(not torch.equal(eta0[k], eta1[k]) for k in weights)
    assert all(torch.equal(eta0[k], plain[k]) for k in plain if k not in buffers)
    # ... while plain SimSiam saw fewer BN passes: the control is needed
    assert any(not torch.equal(eta0[k], plain[k]) for k in buffers if k in plain)
