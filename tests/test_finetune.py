"""2-class fine-tuning: models, losses, schedule, sampling, augmentation, aggregation, tables."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchvision.transforms import v2

from spotdiff.errors import ConfigError, WeightsError
from spotdiff.finetune import BinaryClassifier, UNet, aggregate, build_model, predict, train_model
from spotdiff.finetune.protocols import mean_std, table_csv, table_markdown, table_rows
from spotdiff.finetune.train import (
    FinetuneConfig,
    TensorData,
    _param_groups,
    augment_batch,
    batch_indices,
    make_augmentation,
    training_steps,
    warmup_steps,
)
from spotdiff.models import build_backbone
from spotdiff.schedules import warmup_cosine


def obvious_defects(n: int, size: int, seed: int) -> TensorData:
    """Grey noise images; the second half carries a red square (the defect, also in the mask)."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, size, size, generator=g) * 60 + 90).to(torch.uint8)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    labels = torch.zeros(n, dtype=torch.int64)
    side = size // 4
    for i in range(n // 2, n):
        y, x = torch.randint(0, size - side, (2,), generator=g).tolist()
        images[i, :, y : y + side, x : x + side] = torch.tensor([250, 20, 20], dtype=torch.uint8)[:, None, None]
        masks[i, y : y + side, x : x + side] = 1
        labels[i] = 1
    types = ["good" if v == 0 else "square" for v in labels.tolist()]
    return TensorData(images, masks, labels, types, [f"img{i}.png" for i in range(n)])


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("hw", [(32, 32), (40, 56)])
def test_unet_maps_have_input_resolution(hw):
    model = UNet(build_backbone("resnet18"), "resnet18").eval()
    images = torch.randn(2, 3, *hw)
    logits = model(images)
    assert logits.shape == (2, *hw)
    scores, maps = model.predict(images)
    assert maps.shape == (2, *hw) and scores.shape == (2,)
    assert torch.all((maps >= 0) & (maps <= 1))
    assert torch.allclose(scores, maps.flatten(1).amax(1))  # image score = max of the map
    # prior-probability bias: an untrained head predicts small anomaly probabilities
    assert float(torch.sigmoid(model.head.bias.detach())) == pytest.approx(0.01)


def test_classifier_scores_are_sigmoid_of_logits():
    model = BinaryClassifier(build_backbone("resnet18")).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (3,)
    scores, maps = model.predict(images)
    assert maps is None
    assert torch.allclose(scores, torch.sigmoid(logits))
    labels = torch.tensor([0, 1, 1])
    expected = -(labels * torch.log(torch.sigmoid(logits)) + (1 - labels) * torch.log(1 - torch.sigmoid(logits)))
    assert float(model.loss(logits, labels)) == pytest.approx(float(expected.mean()), rel=1e-5)


def test_focal_loss_matches_its_definition():
    model = UNet(build_backbone("resnet18"), "resnet18")
    logits = torch.tensor([[[2.0, -1.0], [0.5, -3.0]]])
    masks = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    p = torch.sigmoid(logits)
    p_t = torch.where(masks == 1, p, 1 - p)
    alpha_t = torch.where(masks == 1, torch.tensor(0.25), torch.tensor(0.75))
    expected = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    assert float(model.loss(logits, torch.tensor([1]), masks)) == pytest.approx(float(expected), rel=1e-5)


def test_weights_for_another_architecture_name_it(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "r18.safetensors"
    save_file(build_backbone("resnet18").state_dict(), str(path))
    build_model("seg", "resnet18", path)  # fits
    with pytest.raises(WeightsError, match="are resnet18 weights, they do not fit resnet50"):
        build_model("cls", "resnet50", path)


def test_param_groups_give_new_layers_the_larger_rate():
    for task in ("cls", "seg"):
        model = build_model(task, "resnet18")
        slow, fast = _param_groups(model, 1e-4, 10.0)
        assert fast["lr"] == pytest.approx(1e-3) and slow["lr"] == 1e-4
        n_all = sum(1 for _ in model.parameters())
        assert len(slow["params"]) + len(fast["params"]) == n_all
        new = model.head if task == "cls" else model.decoder
        assert {id(p) for p in new.parameters()} <= {id(p) for p in fast["params"]}


# ----------------------------------------------------------------------------- schedule, sampling, augmentation


def test_warmup_then_cosine_to_zero():
    total = 100
    factors = [warmup_cosine(s, total, warmup_steps(total)) for s in range(total)]
    assert factors[0] == pytest.approx(1 / 5) and factors[4] == pytest.approx(1.0)  # 5 % warm-up
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))  # then non-increasing
    assert factors[-1] < 1e-3


def test_training_steps_rule():
    cfg = FinetuneConfig(task="cls", protocol="10shot", data=".", out=".", batch_size=16)
    assert training_steps(cfg, 20) == 300
    cfg = dataclasses.replace(cfg, epochs=3)  # the config is frozen (spotdiff.configs): checked once, then read
    assert training_steps(cfg, 20) == 3 * 2
    cfg = dataclasses.replace(cfg, epochs=None, steps=7)
    assert training_steps(cfg, 20) == 7


def test_balanced_batches_alternate_classes_and_cycle_each_class():
    labels = [0] * 9 + [1] * 3
    batches = list(batch_indices(labels, 6, 3, seed=0))
    assert len(batches) == 3 and all(len(b) == 6 for b in batches)
    flat = np.concatenate(batches)
    assert [labels[i] for i in flat] == [0, 1] * 9  # exactly half anomalous
    anomalous = [i for i in flat if labels[i] == 1]
    assert sorted(anomalous[:3]) == [9, 10, 11] and sorted(anomalous[3:6]) == [9, 10, 11]
    assert sorted(i for i in flat if labels[i] == 0) == list(range(9))  # one pass over the normals
    again = list(batch_indices(labels, 6, 3, seed=0))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = np.concatenate(list(batch_indices(labels, 6, 3, seed=1)))
    assert not np.array_equal(flat, other)


def test_batch_size_is_capped_by_the_training_set():
    batches = list(batch_indices([0, 0, 1, 1], 16, 2, seed=0))
    assert [sorted(b.tolist()) for b in batches] == [[0, 1, 2, 3]] * 2


def test_augmentation_moves_mask_with_image():
    torch.manual_seed(3)
    data = obvious_defects(8, 48, seed=0)
    data.labels[:] = 1
    data.masks[: len(data) // 2, 5:20, 10:30] = 1  # a defect on the "normal" half too
    data.images[: len(data) // 2, :, 5:20, 10:30] = torch.tensor([250, 20, 20], dtype=torch.uint8)[:, None, None]
    images, masks, labels = augment_batch(data.images, data.masks, data.labels, make_augmentation(48))
    assert images.shape == (8, 3, 48, 48) and masks.shape == (8, 48, 48)
    assert images.dtype == torch.float32 and 0 <= float(images.min()) and float(images.max()) <= 1
    red = images[:, 0] > 0.7
    agreement = (red == (masks > 0)).float().mean()
    assert agreement > 0.98  # only resampling borders may disagree
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_cropped_out_defect_becomes_normal():
    data = obvious_defects(2, 32, seed=0)
    data.masks[:] = 0
    data.masks[1, :4, :4] = 1  # defect in the corner only
    data.labels[:] = torch.tensor([0, 1])
    center = v2.Compose([v2.CenterCrop(16), v2.Resize(32)])
    _, masks, labels = augment_batch(data.images, data.masks, data.labels, center)
    assert labels.tolist() == [0, 0] and masks.sum() == 0
    # an anomalous image without a mask keeps its label
    _, _, labels = augment_batch(data.images, torch.zeros_like(data.masks), torch.tensor([1, 1]), center)
    assert labels.tolist() == [1, 1]


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_learns_an_obvious_defect_in_a_few_steps(task):
    train, test = obvious_defects(20, 32, seed=0), obvious_defects(40, 32, seed=1)
    torch.manual_seed(0)
    model = build_model(task, "resnet18")
    losses = train_model(model, train, steps=15, batch_size=8, lr=1e-3, seed=0)
    assert len(losses) == 15 and np.mean(losses[-3:]) < np.mean(losses[:3])
    scores, maps = predict(model, test.images)
    # measured: image AU-ROC 1.0 (cls and seg), pixel AU-ROC 0.999 (seg); chance is 0.5
    assert roc_auc_score(test.labels.numpy(), scores) > 0.9
    if task == "seg":
        assert maps.shape == (40, 32, 32)
        assert roc_auc_score(test.masks.numpy().ravel(), maps.ravel()) > 0.9


def test_training_is_reproducible_per_seed():
    data = obvious_defects(8, 32, seed=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        model = build_model("cls", "resnet18")
        runs.append(train_model(model, data, steps=3, batch_size=4, lr=1e-3, seed=5))
    assert runs[0] == runs[1]


# ----------------------------------------------------------------------------- aggregation and tables


def test_aggregate_is_mean_and_sample_std_over_seeds():
    per_seed = [
        {"image_auroc": 1.0, "image_aupr": 0.5, "per_defect_type": {"crack": {"image_auroc": 0.25}}},
        {"image_auroc": 2.0, "image_aupr": 0.5, "per_defect_type": {"crack": {"image_auroc": 0.75}}},
        {"image_auroc": 3.0, "image_aupr": 0.5, "per_defect_type": {"crack": {"image_auroc": 0.5}}},
    ]
    agg = aggregate(per_seed)
    assert agg["image_auroc"] == {"mean": 2.0, "std": 1.0, "n": 3}
    assert agg["image_aupr"] == {"mean": 0.5, "std": 0.0, "n": 3}
    assert agg["per_defect_type"]["crack"]["image_auroc"] == {"mean": 0.5, "std": 0.25, "n": 3}
    two = aggregate([{"m": 1.0}, {"m": 3.0}])["m"]
    assert two == {"mean": 2.0, "std": math.sqrt(2.0), "n": 2}  # divisor n - 1, not n


def test_aggregate_edge_cases():
    assert mean_std([0.7]) == {"mean": 0.7, "std": None, "n": 1}  # one seed: no spread estimate
    assert mean_std([float("nan"), 1.0, 3.0]) == {"mean": 2.0, "std": math.sqrt(2.0), "n": 2}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}
    assert aggregate([{"name": "x", "m": 1.0}]) == {"m": {"mean": 1.0, "std": None, "n": 1}}


def test_table_has_objects_then_mean_row_aupr_before_auroc():
    per_object = {
        "a": [{"image_aupr": 0.8, "image_auroc": 0.9}, {"image_aupr": 0.6, "image_auroc": 0.7}],
        "b": [{"image_aupr": 0.4, "image_auroc": 0.5}, {"image_aupr": 0.2, "image_auroc": 0.3}],
    }
    metrics = ("image_aupr", "image_auroc")
    rows = table_rows(per_object, metrics)
    assert list(rows) == ["a", "b", "mean"]
    assert rows["mean"]["image_aupr"]["mean"] == pytest.approx(0.5)  # mean of the object means
    # std of the per-seed object average: seeds give 0.6 and 0.4
    assert rows["mean"]["image_aupr"]["std"] == pytest.approx(math.sqrt(0.02))
    text = table_csv(rows, metrics).splitlines()
    assert text[0] == "object,image_aupr_mean,image_aupr_std,image_auroc_mean,image_auroc_std"
    assert text[3].startswith("mean,0.5")
    md = table_markdown(rows, metrics)
    assert "| object | image AU-PR | image AU-ROC |" in md
    assert "| a | 70.0 ± 14.1 | 80.0 ± 14.1 |" in md
    assert "| **mean** | **50.0 ± 14.1** |" in md


def test_config_rejects_bad_options():
    with pytest.raises(ConfigError, match="protocol"):
        FinetuneConfig(task="cls", protocol="3shot", data=".", out=".").validate()
    with pytest.raises(ConfigError, match="task"):
        FinetuneConfig(task="det", protocol="5shot", data=".", out=".").validate()
    with pytest.raises(ConfigError, match="steps or epochs"):
        FinetuneConfig(task="cls", protocol="5shot", data=".", out=".", steps=3, epochs=2).validate()
