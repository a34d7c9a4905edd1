"""PatchCore: coreset, nearest neighbours, reweighted score, features, detection, save/load."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detect_fakes import as_dataset, square_images
from sklearn.metrics import roc_auc_score

from spotdiff.detect import Detector, PatchCore
from spotdiff.detect.features import patchcore_embedding
from spotdiff.detect.patchcore import HAVE_FAISS, greedy_coreset, nearest_neighbors, random_projection, sharded_coreset
from spotdiff.errors import ConfigError, DataError
from spotdiff.models import build_backbone, extract_features


@pytest.fixture(scope="module")
def fitted() -> PatchCore:
    return PatchCore(arch="resnet18", batch_size=4, coreset_ratio=0.25).fit(as_dataset(square_images(8)))


def naive_k_center(points: np.ndarray, n: int, first: int) -> list[int]:
    """Textbook greedy k-center: explicit loops over points and centres."""
    chosen = [first]
    while len(chosen) < n:
        best, best_dist = -1, -1.0
        for i, p in enumerate(points):
            nearest = min(float(np.sum((p - points[c]) ** 2)) for c in chosen)
            if nearest > best_dist:
                best, best_dist = i, nearest
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("projection_dim", [None, 4])
def test_coreset_equals_naive_greedy(projection_dim):
    rng = np.random.default_rng(0)
    points = rng.normal(size=(60, 8)).astype(np.float32)
    got = greedy_coreset(torch.from_numpy(points), 12, projection_dim=projection_dim, seed=3)
    space = points if projection_dim is None else random_projection(torch.from_numpy(points), 4, seed=3).numpy()
    first = int(torch.randint(60, (1,), generator=torch.Generator().manual_seed(3)))
    assert got.tolist() == naive_k_center(space.astype(np.float64), 12, first)
    assert len(set(got.tolist())) == 12


def test_coreset_rejects_bad_sizes():
    with pytest.raises(ConfigError):
        greedy_coreset(torch.randn(5, 3), 6)


def test_random_projection_roughly_preserves_distances():
    x = torch.randn(50, 512)
    z = random_projection(x, 256, seed=0)
    ratio = torch.pdist(z) / torch.pdist(x)
    assert 0.8 < float(ratio.mean()) < 1.2 and float(ratio.std()) < 0.15


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")
def test_faiss_and_torch_neighbours_agree():
    import faiss

    bank, queries = torch.randn(300, 16), torch.randn(40, 16)
    index = faiss.IndexFlatL2(16)
    index.add(bank.numpy())
    d_faiss, i_faiss = nearest_neighbors(queries, bank, 5, index)
    d_torch, i_torch = nearest_neighbors(queries, bank, 5, None)
    exact = torch.cdist(queries.double(), bank.double()).topk(5, largest=False)
    assert torch.equal(i_faiss, i_torch) and torch.equal(i_torch, exact.indices)
    torch.testing.assert_close(d_faiss, exact.values.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d_torch, exact.values.float(), atol=1e-4, rtol=1e-4)


def test_reweighted_score_follows_paper_formula(fitted):
    rng = np.random.default_rng(2)
    bank = fitted.memory_bank_.numpy().astype(np.float64)
    patches = rng.normal(size=(2, 10, bank.shape[1])) + bank.mean(0)
    dists = np.sqrt(((patches[:, :, None] - bank[None, None]) ** 2).sum(-1))  # (B, P, M)
    expected = []
    for b in range(2):
        patch_scores = dists[b].min(1)
        p = int(patch_scores.argmax())
        s_star = patch_scores[p]
        m_star = int(dists[b, p].argmin())
        support = np.argsort(((bank - bank[m_star]) ** 2).sum(1))[:9]
        d_support = np.sqrt(((bank[support] - patches[b, p]) ** 2).sum(1))
        expected.append((1 - np.exp(s_star) / np.exp(d_support).sum()) * s_star)
    t = torch.from_numpy(patches).float()
    d, idx = nearest_neighbors(t.reshape(-1, t.shape[-1]), fitted.memory_bank_, 1, fitted._index)
    got = fitted._reweighted_scores(t, d[:, 0].reshape(2, 10), idx[:, 0].reshape(2, 10))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_embedding_is_locally_averaged_and_upsampled():
    backbone = build_backbone("resnet18").eval()
    images = torch.randn(2, 3, 64, 64)
    emb = patchcore_embedding(backbone, images, ["layer2", "layer3"])
    feats = extract_features(backbone, images, ["layer2", "layer3"])
    assert emb.shape == (2, 128 + 256, 8, 8)
    # interior cell of layer2: plain 3x3 mean
    torch.testing.assert_close(emb[:, :128, 3, 4], feats["layer2"][:, :, 2:5, 3:6].mean((-2, -1)))
    l3 = F.avg_pool2d(feats["layer3"], 3, 1, 1, count_include_pad=False)
    torch.testing.assert_close(emb[:, 128:], F.interpolate(l3, size=(8, 8), mode="bilinear", align_corners=False))
    reduced = patchcore_embedding(backbone, images, ["layer2", "layer3"], target_dim=96)
    torch.testing.assert_close(reduced[:, 0], emb[:, :4].mean(1))


def test_memory_bank_size(fitted):
    assert fitted.memory_bank_.shape == (int(8 * 8 * 8 * 0.25), 384)
    full = PatchCore(arch="resnet18", coreset_ratio=1.0).fit(as_dataset(square_images(3)))
    assert full.memory_bank_.shape == (3 * 64, 384)


def test_detects_defects_and_localises_them(fitted):
    good, bad = square_images(6, seed=1), square_images(6, defect=True, seed=2)
    s_good, _ = fitted.predict(good)
    s_bad, m_bad = fitted.predict(bad)
    assert m_bad.shape == (6, 64, 64) and s_bad.min() > s_good.max()
    mask = (bad[:, 0] > 0.9).flatten().numpy()
    assert roc_auc_score(mask, m_bad.flatten().numpy()) > 0.85


def test_torch_backend_matches_faiss(fitted):
    images = square_images(3, defect=True, seed=4)
    torch_model = copy.copy(fitted).set_params(nn_backend="torch")  # same fitted backbone and bank
    torch_model._set_bank(fitted.memory_bank_)
    assert torch_model._index is None
    for a, b in zip(fitted.predict(images), torch_model.predict(images), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_identical(fitted, tmp_path):
    images = square_images(3, defect=True, seed=5)
    fitted.save(tmp_path / "m")
    loaded = Detector.load(tmp_path / "m")
    assert isinstance(loaded, PatchCore) and loaded.coreset_ratio == 0.25
    assert torch.equal(loaded.memory_bank_, fitted.memory_bank_)
    for a, b in zip(fitted.predict(images), loaded.predict(images), strict=True):
        assert torch.equal(a, b)


def test_bad_input():
    with pytest.raises(DataError, match="empty"):
        PatchCore(arch="resnet18").fit([])
    with pytest.raises(ConfigError, match="coreset ratio"):
        PatchCore(arch="resnet18", coreset_ratio=0.0).check_params()
    with pytest.raises(ConfigError, match="unknown architecture"):
        PatchCore(arch="vgg16").check_params()


@pytest.mark.slow
def test_finds_synthetic_defects(tmp_path_factory):
    """Random-init resnet18 on synthetic cashews, 128 px (measured: image 0.66, pixel 0.92 AU-ROC)."""
    from spotdiff.data import open_dataset
    from spotdiff.data.synth import generate
    from spotdiff.detect.evaluate import evaluate_detector

    root = generate(tmp_path_factory.mktemp("synth"), seed=0, scale=0.5, image_size=128, objects=["cashew_synth"])
    train = open_dataset(root, "cashew_synth", subset="train", image_size=128)
    test = open_dataset(root, "cashew_synth", subset="test", image_size=128)
    metrics, _, _, _ = evaluate_detector(PatchCore("resnet18").fit(train), test)
    assert metrics["image_auroc"] > 0.6 and metrics["pixel_auroc"] > 0.85


def _materialised_bank(model: PatchCore, images: torch.Tensor) -> torch.Tensor:
    """Every training patch feature, computed in the same batches as ``fit`` (the old, materialised bank)."""
    from spotdiff.data.transforms import normalize

    with torch.inference_mode():
        parts = [
            model._embed(normalize(images[i : i + model.forward_batch]))
            for i in range(0, images.shape[0], model.forward_batch)
        ]
    return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])


@pytest.mark.parametrize("projection_dim", [16, None])
def test_streaming_bank_equals_materialised_bank(projection_dim, tmp_path):
    """With the approximation off, the streamed fit selects exactly the materialised greedy coreset."""
    images = square_images(7, seed=3)
    model = PatchCore(
        arch="resnet18",
        batch_size=4,
        coreset_ratio=0.1,
        projection_dim=projection_dim,
        coreset_shard=None,
        spill_dir=tmp_path,
    ).fit(as_dataset(images))
    full = _materialised_bank(model, images)
    keep = greedy_coreset(full, int(full.shape[0] * 0.1), projection_dim, seed=0)
    assert torch.equal(model.memory_bank_, full[keep])
    assert list(tmp_path.iterdir()) == []  # the temporary feature file is gone


def test_sharded_coreset_is_per_shard_greedy():
    z = torch.randn(1000, 8)
    assert torch.equal(sharded_coreset(z, 50, None, seed=2), greedy_coreset(z, 50, None, seed=2))
    assert torch.equal(sharded_coreset(z, 50, 1000, seed=2), greedy_coreset(z, 50, None, seed=2))
    got = sharded_coreset(z, 50, 300, seed=2)  # 4 shards of 250 rows, 13 + 13 + 12 + 12 centres
    expected = torch.cat(
        [
            greedy_coreset(z[a : a + 250], q, None, seed=2 + i) + a
            for i, (a, q) in enumerate(zip(range(0, 1000, 250), (13, 13, 12, 12)))
        ]
    )
    assert torch.equal(got, expected) and got.unique().numel() == 50


def test_sharded_fit_keeps_the_ratio_and_detects(tmp_path):
    images = square_images(8)
    model = PatchCore(arch="resnet18", batch_size=4, coreset_ratio=0.25, coreset_shard=100, spill_dir=tmp_path).fit(
        as_dataset(images)
    )
    assert model.memory_bank_.shape == (128, 384)
    full = _materialised_bank(model, images)
    assert all(any(torch.equal(row, f) for f in full) for row in model.memory_bank_[:5])
    s_good, _ = model.predict(square_images(4, seed=1))
    s_bad, _ = model.predict(square_images(4, defect=True, seed=2))
    assert s_bad.min() > s_good.max()


def test_refuses_a_bank_larger_than_memory(monkeypatch):
    monkeypatch.setattr("spotdiff.detect.memory.available_bytes", lambda: 50_000)
    with pytest.raises(
        ConfigError,
        match=r"PatchCore on 256 patches x 384 channels .* need about .* but only "
        r"50.0 kB .* smaller --coreset-ratio or --image-size",
    ):
        PatchCore(arch="resnet18", batch_size=4).fit(as_dataset(square_images(4)))
    with pytest.raises(ConfigError, match=r"coreset ratio must be in \(0, 1\].*got 1.5"):
        PatchCore(arch="resnet18", coreset_ratio=1.5).check_params()
    with pytest.raises(ConfigError, match="coreset_shard"):
        PatchCore(arch="resnet18", coreset_shard=0).check_params()


def test_model_written_before_coreset_shard_loads(fitted, tmp_path):
    """A config.json without ``coreset_shard`` (model files from before it existed) still loads."""
    from spotdiff.detect import store

    fitted.save(tmp_path / "new")
    config, tensors, backbone = store.load_model_dir(tmp_path / "new")
    del config["coreset_shard"]
    store.save_model_dir(tmp_path / "old", config, tensors, backbone)
    loaded = Detector.load(tmp_path / "old")
    assert loaded.coreset_shard == 65536 and torch.equal(loaded.memory_bank_, fitted.memory_bank_)


_NO_FAISS = """
import sys
sys.modules["faiss"] = None  # `import faiss` now raises ImportError, as on a machine without the extra
import numpy as np, torch
from detect_fakes import as_dataset, square_images
from spotdiff.detect import PatchCore
from spotdiff.detect import patchcore as pc
assert not pc.HAVE_FAISS
model = PatchCore(arch="resnet18", batch_size=4, coreset_ratio=0.25).fit(as_dataset(square_images(8)))
assert model.nn_backend == "auto" and model._index is None
images = square_images(3, defect=True, seed=4)
scores, maps = model.predict(images)
with torch.inference_mode():
    patches = model._embed(model._prepare(images)).flatten(0, 2)
_, idx = pc.nearest_neighbors(patches, model.memory_bank_, 3, model._index)
np.savez(sys.argv[1], scores=scores, maps=maps, bank=model.memory_bank_, idx=idx)
"""


@pytest.mark.skipif(not HAVE_FAISS, reason="compares the fallback with faiss")
def test_without_faiss_the_torch_fallback_is_silent_and_identical(fitted, tmp_path):
    """faiss is an optional extra: without it ``nn_backend="auto"`` falls back to torch with no
    ImportError and no output, and finds the same neighbours and scores as faiss."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root / 'tests'}", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "no_faiss.npz"
    done = subprocess.run(
        [sys.executable, "-c", _NO_FAISS, str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "faiss" not in done.stderr.lower() and done.stdout == ""
    assert fitted._index is not None  # this process uses faiss
    images = square_images(3, defect=True, seed=4)
    scores, maps = fitted.predict(images)
    with torch.inference_mode():
        patches = fitted._embed(fitted._prepare(images)).flatten(0, 2)
    _, idx = nearest_neighbors(patches, fitted.memory_bank_, 3, fitted._index)
    with np.load(out) as got:
        assert np.array_equal(got["bank"], fitted.memory_bank_.numpy())  # same coreset: faiss plays no part
        assert np.array_equal(got["idx"], idx.numpy())  # same 3 nearest neighbours of every test patch
        np.testing.assert_allclose(got["scores"], scores.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["maps"], maps.numpy(), rtol=1e-4, atol=1e-4)
