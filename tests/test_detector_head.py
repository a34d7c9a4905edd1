"""The fitted heads (detect/head.py, padim_head.py, patchcore_head.py): one module that predict and export run.

The eager head is what ``predict`` runs; the traceable head is what ``export`` captures. Both share
feature assembly, the image score and the maps, and differ only in the swappable parts (stem
batching, the distance / nearest-neighbour search, the channel reduction): they must agree.
"""

from __future__ import annotations

import pytest
import torch
from detect_fakes import as_dataset, square_images

from spotdiff.data.transforms import normalize
from spotdiff.detect import PaDiM, PatchCore
from spotdiff.detect.export import detector_graph
from spotdiff.detect.head import feature_grid

RTOL = 1e-4


@pytest.fixture(scope="module")
def models() -> dict[str, PaDiM | PatchCore]:
    train = as_dataset(square_images(6, size=48, seed=3))
    return {
        "padim": PaDiM(arch="resnet18", d=24, batch_size=4).fit(train),
        "patchcore": PatchCore(arch="resnet18", coreset_ratio=0.25, batch_size=4).fit(train),
        "patchcore_reduced": PatchCore(arch="resnet18", coreset_ratio=0.25, target_dim=96, batch_size=4).fit(train),
    }


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= RTOL * scale


@pytest.mark.parametrize("name", ["padim", "patchcore", "patchcore_reduced"])
def test_traceable_head_computes_what_predict_computes(models, name):
    model = models[name]
    images = torch.cat([square_images(2, size=48, seed=8), square_images(2, size=48, defect=True, seed=9)])
    want_scores, want_maps = model.predict(images)
    with torch.no_grad():
        eager_scores, eager_maps = model.head()(normalize(images))
        graph_scores, graph_maps = detector_graph(model)(images)
    assert torch.equal(eager_scores, want_scores) and torch.equal(eager_maps, want_maps)  # predict runs the head
    _close(graph_scores, want_scores)
    _close(graph_maps, want_maps)
    assert want_scores[2:].min() > want_scores[:2].max()  # the defects score higher: not a degenerate head


@pytest.mark.parametrize("name", ["padim", "patchcore"])
def test_export_graph_leaves_the_detector_untouched(models, name):
    model = models[name]
    images = square_images(2, size=48, defect=True, seed=5)
    before = model.predict(images)
    model.backbone_.train()  # an unusual mode, to see that building the graph neither keeps nor resets it
    own = {t.data_ptr() for t in (*model.backbone_.parameters(), *model._state().values())}
    graph = detector_graph(model)
    try:
        assert model.backbone_.training and graph.head.backbone is not model.backbone_
        assert not graph.head.backbone.training and not graph.training
        shared = {t.data_ptr() for t in (*graph.parameters(), *graph.buffers())} & own
        assert not shared  # a copy: nothing the graph holds is the model's memory
        with torch.no_grad():
            for p in graph.parameters():
                p.add_(1.0)  # changing the graph does not change the model
    finally:
        model.backbone_.eval()
    assert all(torch.equal(a, b) for a, b in zip(before, model.predict(images), strict=True))


def test_feature_grid_matches_the_backbone(models):
    model = models["patchcore"]
    for size in ((48, 48), (50, 37), (64, 81)):
        with torch.no_grad():
            feats = model.head().backbone  # the inference backbone: stem and stages
            x = feats.maxpool(feats.relu(feats.bn1(feats.conv1(torch.zeros(1, 3, *size)))))
            for layer in ("layer1", "layer2", "layer3"):
                x = getattr(feats, layer)(x)
                assert tuple(x.shape[-2:]) == feature_grid(size, layer)
