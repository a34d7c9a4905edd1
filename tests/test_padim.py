"""PaDiM: streaming Gaussian statistics, Mahalanobis, embedding, detection, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detect_fakes import as_dataset, square_images
from sklearn.metrics import roc_auc_score

from spotdiff.detect import Detector, PaDiM, PatchCore
from spotdiff.detect.features import padim_embedding, upsample_and_smooth
from spotdiff.detect.gaussian import GaussianAccumulator, mahalanobis, unpack_lower
from spotdiff.detect.padim import channel_subset
from spotdiff.detect.store import MANIFEST_FILE, MODEL_FILE
from spotdiff.errors import ConfigError, DataError, WeightsError
from spotdiff.models import build_backbone, extract_features


@pytest.fixture(scope="module")
def fitted() -> PaDiM:
    torch.manual_seed(0)
    return PaDiM(arch="resnet18", d=40, batch_size=4).fit(as_dataset(square_images(12)))


def test_streaming_statistics_equal_batch_statistics():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(37, 5, 4)) * [1.0, 2.0, 0.5, 3.0] + 1000.0  # large offset: conditioning
    data[:, :, 1] += 0.7 * data[:, :, 0]
    acc = GaussianAccumulator(positions=5, dim=4)
    start = 0
    for size in (1, 7, 13, 16):
        acc.update(torch.from_numpy(data[start : start + size]))
        start += size
    np.testing.assert_allclose(acc.mean().numpy(), data.mean(axis=0), rtol=0, atol=1e-9)
    expected = np.stack([np.cov(data[:, p], rowvar=False, ddof=1) for p in range(5)])
    np.testing.assert_allclose(acc.covariance().numpy(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("stage", [1, 3, 64])
def test_staged_float32_updates_match_float64_statistics(stage):
    rng = np.random.default_rng(1)
    data = (rng.normal(size=(29, 7, 5)) * 2.0 + 50.0).astype(np.float32)
    acc = GaussianAccumulator(positions=7, dim=5, stage=stage)
    for start in range(0, 29, 4):  # updates of 4 that straddle the staging boundary
        acc.update(torch.from_numpy(data[start : start + 4]))
    assert acc.count == 29
    exact = data.astype(np.float64)
    np.testing.assert_allclose(acc.mean().numpy(), exact.mean(axis=0), rtol=0, atol=1e-5)
    expected = np.stack([np.cov(exact[:, p], rowvar=False, ddof=1) for p in range(7)])
    np.testing.assert_allclose(acc.covariance().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_accumulator_memory_does_not_grow_with_samples():
    acc = GaussianAccumulator(positions=6, dim=3)

    def nbytes() -> int:
        tensors = [acc.sum, acc.shift, acc.sum_sq, acc._staged]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    acc.update(torch.randn(4, 6, 3))
    first = nbytes()
    for _ in range(20):
        acc.update(torch.randn(8, 6, 3))
    assert nbytes() == first and acc.count == 164


def test_accumulator_chunks_positions(monkeypatch):
    monkeypatch.setattr("spotdiff.detect.gaussian._CHUNK_BYTES", 8 * 3 * 3 * 2)  # 2 positions per chunk
    monkeypatch.setattr("spotdiff.detect.gaussian._FOLD_POSITIONS", 2)
    monkeypatch.setattr(GaussianAccumulator, "ROW_BLOCK", 2)  # row blocks [0, 2) and [2, 3)
    acc = GaussianAccumulator(positions=5, dim=3)
    assert acc._spans() == [(0, 2), (2, 4), (4, 5)]
    x = torch.randn(9, 5, 3, dtype=torch.float64)
    x_before = x.clone()
    acc.update(x[:4])
    acc.update(x[4:])
    assert torch.equal(x, x_before)  # the caller's tensor is not modified
    cov = np.stack([np.cov(x[:, p].numpy(), rowvar=False) for p in range(5)])
    np.testing.assert_allclose(acc.covariance().numpy(), cov, atol=1e-12)
    # the chunked in-place factorisation equals a direct one
    inv_chol = acc.inverse_cholesky(0.01).double().numpy()
    expected = np.linalg.inv(np.linalg.cholesky(cov + 0.01 * np.eye(3)))
    np.testing.assert_allclose(inv_chol, expected, rtol=1e-5, atol=1e-5)


def test_inverse_cholesky_is_regularised_precision_factor():
    x = torch.randn(10, 3, 4, dtype=torch.float64)
    acc = GaussianAccumulator(positions=3, dim=4)
    acc.update(x)
    cov = acc.covariance()
    inv_chol = acc.inverse_cholesky(epsilon=0.01).double()
    precision = inv_chol.transpose(1, 2) @ inv_chol
    expected = torch.linalg.inv(cov + 0.01 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(precision, expected, rtol=1e-4, atol=1e-4)
    assert torch.all(inv_chol.triu(1) == 0)
    with pytest.raises(RuntimeError, match="finalised"):  # the buffer now holds the result
        acc.update(x)


@pytest.mark.parametrize("threads", [1, 2])
def test_lapack_factorisation_equals_torch_over_chunks_and_threads(threads):
    """potrf + trtri on a thread pool, several chunks of positions, equals torch's cholesky + inverse."""
    d, positions = 40, 7
    x = torch.randn(60, positions, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    acc = GaussianAccumulator(positions=positions, dim=d)
    acc.chunk = 3  # three chunks, the last one short
    acc.update(x)
    cov = acc.covariance() + 0.01 * torch.eye(d, dtype=torch.float64)
    expected = torch.linalg.inv(torch.linalg.cholesky(cov))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = acc.inverse_cholesky(0.01)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.all(got.triu(1) == 0)


def test_not_positive_definite_is_a_data_error():
    acc = GaussianAccumulator(positions=2, dim=3)
    acc.update(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(DataError, match="not positive definite; increase epsilon"):
        acc.inverse_cholesky(-100.0)


def test_too_few_samples_raise():
    acc = GaussianAccumulator(positions=2, dim=2)
    acc.update(torch.randn(1, 2, 2))
    with pytest.raises(DataError, match="at least 2"):
        acc.inverse_cholesky(0.01)


def test_mahalanobis_equals_direct_numpy():
    rng = np.random.default_rng(1)
    p, d, b = 6, 5, 3
    mean = rng.normal(size=(p, d))
    a = rng.normal(size=(p, d, d))
    cov = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(d)
    x = rng.normal(size=(b, p, d))
    inv_chol = np.linalg.inv(np.linalg.cholesky(cov))
    got = mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(inv_chol)).numpy()
    expected = np.empty((b, p))
    for i in range(b):
        for j in range(p):
            diff = x[i, j] - mean[j]
            expected[i, j] = np.sqrt(diff @ np.linalg.inv(cov[j]) @ diff)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_embedding_equals_full_concatenation_then_selection():
    backbone = build_backbone("resnet18").eval()
    images = torch.randn(2, 3, 64, 64)
    layers = ["layer1", "layer2", "layer3"]
    index = torch.tensor([0, 5, 63, 64, 100, 191, 192, 447])
    got = padim_embedding(backbone, images, layers, index, "resnet18")
    feats = extract_features(backbone, images, layers)
    size = feats["layer1"].shape[-2:]
    full = torch.cat([F.interpolate(feats[n], size=size, mode="nearest") for n in layers], dim=1)
    torch.testing.assert_close(got, full[:, index])


def test_smoothing_at_the_same_size_is_scipys_gaussian_filter():
    """No upsampling (size = the map's): the plain Gaussian blur, equal to scipy's; constants and mass kept."""
    from scipy import ndimage

    maps = torch.rand(2, 40, 33, dtype=torch.float64)
    expected = np.stack([ndimage.gaussian_filter(m, 4.0, mode="mirror", truncate=4.0) for m in maps.numpy()])
    np.testing.assert_allclose(upsample_and_smooth(maps, (40, 33), 4.0).numpy(), expected, rtol=0, atol=1e-12)
    const = torch.full((1, 40, 40), 3.0)
    torch.testing.assert_close(upsample_and_smooth(const, (40, 40), 4.0), const)
    spike = torch.zeros(1, 81, 81)
    spike[0, 40, 40] = 1.0
    blurred = upsample_and_smooth(spike, (81, 81), 4.0)
    assert abs(float(blurred.sum()) - 1.0) < 1e-5
    assert blurred[0].argmax() == 40 * 81 + 40


def test_upsample_and_smooth_equals_scipy_reference():
    from scipy import ndimage

    grid = torch.rand(3, 16, 12, dtype=torch.float64)
    up = F.interpolate(grid[:, None], size=(64, 48), mode="bilinear", align_corners=False)[:, 0].numpy()
    expected = np.stack([ndimage.gaussian_filter(u, 4.0, mode="mirror", truncate=4.0) for u in up])
    np.testing.assert_allclose(upsample_and_smooth(grid, (64, 48)).numpy(), expected, rtol=0, atol=1e-12)
    # maps smaller than the kernel radius: reflected, then replicated borders; constants stay constant
    torch.testing.assert_close(upsample_and_smooth(torch.full((1, 5, 3), 2.0), (5, 3), 4.0), torch.full((1, 5, 3), 2.0))


def test_predict_is_batch_independent(fitted):
    images = square_images(7, defect=True, seed=9)  # 7 > the CPU forward batch: several chunks
    assert fitted.forward_batch < 7
    scores, maps = fitted.predict(images)
    one_by_one = [fitted.predict(images[i : i + 1]) for i in range(7)]
    torch.testing.assert_close(scores, torch.cat([s for s, _ in one_by_one]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps, torch.cat([m for _, m in one_by_one]), rtol=1e-5, atol=1e-5)


def test_channel_subset_is_seeded():
    layers = ("layer1", "layer2", "layer3")
    (d_a, a), (_, b), (_, c) = (channel_subset("resnet18", layers, 30, seed) for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert d_a == 30 and a.numel() == 30 and torch.all(a[1:] > a[:-1])
    assert (
        channel_subset("resnet18", layers, None, 0)[0] == 100
        and channel_subset("resnet18", ["layer1"], 500, 0)[0] == 64
    )
    fa, fb = (PaDiM("resnet18", d=30, seed=3).fit(as_dataset(square_images(2))) for _ in range(2))
    assert torch.equal(fa.channel_index_, a) and fa.d_ == 30
    assert torch.equal(fa.backbone_.conv1.weight, fb.backbone_.conv1.weight)


def test_detects_defects_and_localises_them(fitted):
    good, bad = square_images(6, seed=1), square_images(6, defect=True, seed=2)
    s_good, m_good = fitted.predict(good)
    s_bad, m_bad = fitted.predict(bad)
    assert m_bad.shape == (6, 64, 64) and s_bad.shape == (6,)
    assert s_bad.min() > s_good.max()
    # the maps localise the squares: pixel AU-ROC over the defective images
    mask = (bad[:, 0] > 0.9).flatten().numpy()
    assert roc_auc_score(mask, m_bad.flatten().numpy()) > 0.85
    torch.testing.assert_close(s_bad, m_bad.flatten(1).amax(1))


def test_predict_resizes_other_sizes(fitted):
    scores, maps = fitted.predict(square_images(2, size=80))
    assert maps.shape == (2, 64, 64) and torch.isfinite(scores).all()


def test_save_load_round_trip_identical(fitted, tmp_path):
    images = square_images(3, defect=True, seed=5)
    fitted.save(tmp_path / "m")
    loaded = Detector.load(tmp_path / "m")
    assert isinstance(loaded, PaDiM) and loaded.d == 40 and loaded.image_size_ == (64, 64)
    for a, b in zip(fitted.predict(images), loaded.predict(images), strict=True):
        assert torch.equal(a, b)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model"] == "padim" and config["layers"] == ["layer1", "layer2", "layer3"]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "m" / MODEL_FILE))  # L^-1 stored as its lower triangle only
    assert saved["inv_cholesky_packed"].shape == (fitted.mean_.shape[0], 40 * 41 // 2)
    assert torch.equal(loaded.inv_chol_, fitted.inv_chol_)
    with pytest.raises(WeightsError, match="not PatchCore"):
        PatchCore.load(tmp_path / "m")
    # saving again over a model directory replaces it; other directories are refused
    fitted.save(tmp_path / "m")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a spotdiff model directory"):
        fitted.save(tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "other"]  # no temp dirs left


def test_saved_backbone_is_the_folded_truncated_feature_network(fitted, tmp_path):
    from safetensors.torch import load_file, save_file

    from spotdiff.detect.store import BACKBONE_FILE, sha256_file

    fitted.save(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / BACKBONE_FILE))
    assert "conv1.bias" in state and not any(".bn" in k or k.startswith(("bn1", "layer4", "fc")) for k in state)
    # a backbone file of another layout (here: one tensor dropped, manifest re-hashed) is refused by name
    del state["layer3.1.conv2.bias"]
    save_file(state, str(tmp_path / "m" / BACKBONE_FILE))
    manifest = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())
    manifest["files"][BACKBONE_FILE] = sha256_file(tmp_path / "m" / BACKBONE_FILE)
    (tmp_path / "m" / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match=r"backbone.safetensors does not fit .*layer3.1.conv2.bias"):
        Detector.load(tmp_path / "m")


def test_tampered_or_missing_files_refused(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    path = tmp_path / "m" / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256 does not match"):
        Detector.load(tmp_path / "m")
    path.unlink()
    with pytest.raises(WeightsError, match="missing"):
        Detector.load(tmp_path / "m")
    (tmp_path / "m" / MANIFEST_FILE).unlink()
    with pytest.raises(WeightsError, match="manifest missing"):
        Detector.load(tmp_path / "m")


def test_unsupported_format_version_refused(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    manifest_path = tmp_path / "m" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="version 99"):
        Detector.load(tmp_path / "m")


def test_bad_training_input():
    with pytest.raises(DataError, match="empty"):
        PaDiM("resnet18", d=10).fit([])
    with pytest.raises(DataError, match="at least 2"):
        PaDiM("resnet18", d=10).fit(as_dataset(square_images(1)))
    with pytest.raises(ConfigError, match="layers"):
        PaDiM("resnet18", layers=["layer3", "layer1"]).check_params()
    with pytest.raises(ConfigError, match="not fitted"):
        PaDiM("resnet18", d=10).predict(square_images(1))


@pytest.mark.slow
def test_finds_synthetic_defects(tmp_path_factory):
    """Random-init resnet18 on synthetic cashews, 128 px (measured: image 0.81, pixel 0.95 AU-ROC)."""
    from spotdiff.data import open_dataset
    from spotdiff.data.synth import generate
    from spotdiff.detect.evaluate import evaluate_detector

    root = generate(tmp_path_factory.mktemp("synth"), seed=0, scale=0.5, image_size=128, objects=["cashew_synth"])
    train = open_dataset(root, "cashew_synth", subset="train", image_size=128)
    test = open_dataset(root, "cashew_synth", subset="test", image_size=128)
    metrics, records, maps, masks = evaluate_detector(PaDiM("resnet18").fit(train), test)
    assert len(records) == len(test) and maps.shape == masks.shape == (len(test), 128, 128)
    assert metrics["image_auroc"] > 0.7 and metrics["pixel_auroc"] > 0.88


def test_save_removes_folders_left_by_an_interrupted_save(tmp_path):
    from spotdiff.detect.store import save_model_dir

    out = tmp_path / "model"
    (tmp_path / ".model.tmp-abc").mkdir()
    (tmp_path / ".model.old-def").mkdir()
    (tmp_path / ".other.tmp-xyz").mkdir()
    save_model_dir(out, {"model": "padim"}, {"t": torch.zeros(2)}, {"w": torch.ones(1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-xyz", "model"]


def test_float32_statistics_match_float64_reference(monkeypatch):
    """float32 sums (shifted, staged) vs the float64 reference: L^-1 and distances agree to 1e-5 (measured 4e-7)."""
    monkeypatch.setattr(GaussianAccumulator, "ROW_BLOCK", 8)  # 4 row blocks, the last one short
    monkeypatch.setattr("spotdiff.detect.gaussian._FOLD_POSITIONS", 5)
    rng = np.random.default_rng(7)
    n, p, d = 90, 12, 30
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    # ReLU-like features: positive offset, correlated channels, spread of scales
    x = np.maximum(rng.normal(size=(n, p, d)) @ mixing + 0.5, 0) * rng.uniform(0.2, 5.0, size=d) + 3.0
    x32 = torch.from_numpy(x.astype(np.float32))
    results = []
    for data in (x32, x32.double()):
        acc = GaussianAccumulator(positions=p, dim=d, stage=4)
        for start in range(0, n, 7):
            acc.update(data[start : start + 7])
        results.append((acc.mean(), acc.inverse_cholesky(0.01).double()))
    (mean32, l32), (mean64, l64) = results
    assert l32.dtype == torch.float64 and results[0][1].dtype == torch.float64
    rel_l = ((l32 - l64).abs().amax(dim=(1, 2)) / l64.abs().amax(dim=(1, 2))).max().item()
    queries = x32[:5] + torch.randn(5, p, d)
    d32 = mahalanobis(queries.double(), mean32, l32)
    d64 = mahalanobis(queries.double(), mean64, l64)
    rel_d = ((d32 - d64).abs() / d64).max().item()
    assert rel_l < 1e-5 and rel_d < 1e-5, (rel_l, rel_d)


def test_float32_sums_are_about_the_size_of_the_packed_model(monkeypatch):
    # ResNet-50 at 256 px, d = 550: sums (1.06x) + 16 staged images (0.06x) + temporaries within 1.15x the
    # packed float32 L^-1, leaving room under issue 15's 1.3x peak for the backbone's activations
    assert GaussianAccumulator.nbytes(4096, 550) < 1.15 * 4096 * (550 * 551 // 2) * 4
    monkeypatch.setattr(GaussianAccumulator, "ROW_BLOCK", 2)
    acc = GaussianAccumulator(positions=9, dim=6)
    acc.update(torch.randn(3, 9, 6))
    # row blocks of 2: 2 x 6 + 2 x 4 + 2 x 2 = 24 values per position (the triangle has 21)
    assert acc.sum_sq is not None and acc.sum_sq.dtype == torch.float32 and acc.sum_sq.shape == (9, 24)
    buffer = acc.sum_sq.data_ptr()
    packed = acc.inverse_cholesky_packed(0.01)
    assert packed.data_ptr() == buffer and packed.dtype == torch.float32  # written over the sums
    full = unpack_lower(packed, 6)
    assert torch.all(full.triu(1) == 0) and full.shape == (9, 6, 6)
    x, mean = torch.randn(2, 9, 6), torch.randn(9, 6)
    torch.testing.assert_close(mahalanobis(x, mean, packed, chunk=4), mahalanobis(x, mean, full), rtol=0, atol=0)


def test_padim_warns_when_covariance_rank_is_below_d(capsys):
    PaDiM(arch="resnet18", d=20, batch_size=4).fit(as_dataset(square_images(6)))
    err = capsys.readouterr().err
    assert "rank at most 5 < d = 20" in err and "epsilon * I = 0.01 * I" in err


def test_padim_refuses_statistics_larger_than_memory(monkeypatch):
    monkeypatch.setattr("spotdiff.detect.memory.available_bytes", lambda: 10_000_000)
    with pytest.raises(
        ConfigError,
        match=r"PaDiM statistics \(d=40, 16x16 positions.*need about .* MB but only "
        r"10.0 MB .* smaller --d or --image-size",
    ):
        PaDiM(arch="resnet18", d=40, batch_size=4).fit(as_dataset(square_images(3)))


def test_predict_with_packed_factor_equals_unpacked(fitted, monkeypatch):
    images = square_images(2, defect=True, seed=6)
    cached = fitted.predict(images)
    assert fitted._unpacked is not None  # small factor: unpacked once and kept
    monkeypatch.setattr("spotdiff.detect.padim.UNPACKED_FACTOR_BYTES", 0)
    fitted._unpacked = None
    streamed = fitted.predict(images)
    assert fitted._unpacked is None
    for a, b in zip(cached, streamed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
