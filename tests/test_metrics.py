"""spotdiff.metrics: exactness against scikit-learn and a plain per-threshold AU-PRO, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from sklearn import metrics as skm

from spotdiff import metrics
from spotdiff.metrics import Evaluator, evaluate, pr_curve, roc_curve

TOL = 1e-6


def sklearn_metrics(labels: np.ndarray, scores: np.ndarray, prefix: str) -> dict[str, float]:
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    return {
        f"{prefix}_auroc": skm.roc_auc_score(labels, scores),
        f"{prefix}_aupr": skm.auc(recall, precision),
        f"{prefix}_ap": skm.average_precision_score(labels, scores),
    }


def assert_close(got: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=TOL), key


def flatten(result: dict, prefix: str = "") -> dict[str, float]:
    """{"a": 1, "per_defect_type": {"t": {"b": 2}}} -> {"a": 1, "per_defect_type/t/b": 2}."""
    flat = {}
    for key, value in result.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def assert_same(got: dict, expected: dict, abs_tol: float = 1e-12) -> None:
    assert flatten(got) == pytest.approx(flatten(expected), abs=abs_tol)


def reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Obviously-correct AU-PRO: every distinct score as a threshold, plain loops."""
    # regions as (image index, boolean mask) pairs
    regions = []
    for i, m in enumerate(masks):
        labelled, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions.extend((i, labelled == r) for r in range(1, n + 1))
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        predicted = maps >= t
        fprs.append(np.count_nonzero(predicted & normal) / np.count_nonzero(normal))
        pros.append(np.mean([predicted[i][r].mean() for i, r in regions]))
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:]):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
            break
    return area / limit


def two_class(labels: np.ndarray) -> bool:
    return 0 < np.count_nonzero(labels) < labels.size


# ------------------------------------------------------------------------------ strategies

finite64 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
finite32 = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
small_ints = st.integers(-3, 3).map(float)


@st.composite
def scored_labels(draw, elements=finite64):
    n = draw(st.integers(2, 60))
    scores = draw(hnp.arrays(np.float64, n, elements=elements))
    # few positives as well as balanced cases
    p_pos = draw(st.sampled_from([0.05, 0.3, 0.5]))
    labels = np.asarray(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if draw(st.booleans()):
        labels = np.random.default_rng(draw(st.integers(0, 2**16))).random(n) < p_pos
    labels[draw(st.integers(0, n - 1))] = True
    labels[draw(st.integers(0, n - 1))] ^= True  # usually leaves both classes
    return scores, labels


@st.composite
def maps_and_masks(draw, max_side=7):
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(2, max_side))
    elements = draw(st.sampled_from([finite32, small_ints, st.sampled_from([0.0, -0.0, 1.0])]))
    maps = draw(hnp.arrays(np.float32, (n, h, w), elements=elements))
    masks = draw(hnp.arrays(bool, (n, h, w)))
    return maps, masks


# ------------------------------------------------------------------------------ image level


@settings(max_examples=150, deadline=None)
@given(scored_labels(st.one_of(finite64, small_ints)))
def test_image_metrics_match_sklearn(case):
    scores, labels = case
    if not two_class(labels):
        return
    assert_close(evaluate(scores, labels), sklearn_metrics(labels, scores, "image"))


@settings(max_examples=80, deadline=None)
@given(scored_labels(st.one_of(finite64, small_ints)))
def test_pr_and_roc_curves_equal_sklearn(case):
    scores, labels = case
    if not two_class(labels):
        return
    precision, recall, thresholds = pr_curve(scores, labels)
    sk_p, sk_r, sk_t = skm.precision_recall_curve(labels, scores)
    np.testing.assert_allclose(precision, sk_p, atol=1e-12)
    np.testing.assert_allclose(recall, sk_r, atol=1e-12)
    np.testing.assert_array_equal(thresholds, sk_t)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_t = skm.roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    np.testing.assert_array_equal(thresholds, sk_t)
    assert skm.auc(recall, precision) == pytest.approx(evaluate(scores, labels)["image_aupr"], abs=TOL)


def test_image_metrics_known_values():
    # one tie between a normal and an anomalous image: AU-ROC counts it one half
    scores = [0.1, 0.4, 0.4, 0.8]
    labels = [0, 0, 1, 1]
    result = evaluate(scores, labels)
    assert result["image_auroc"] == pytest.approx((4 - 0.5) / 4)
    # AP: recall 1/2 at precision 1, recall 1 at precision 2/3
    assert result["image_ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # AU-PR: (0,1)-(0.5,1)-(1,2/3) by trapezoids
    assert result["image_aupr"] == pytest.approx(0.5 + 0.5 * (1 + 2 / 3) / 2)
    assert set(result) == {"image_auroc", "image_aupr", "image_ap"}


# ------------------------------------------------------------------------------ pixel level


@settings(max_examples=150, deadline=None)
@given(maps_and_masks(), st.sampled_from([None, 1, 2, 4]))
def test_pixel_metrics_match_sklearn(case, bucket_bits):
    """Default bucketing and very coarse bucketing (every pixel in a shared bucket) are exact."""
    maps, masks = case
    if not two_class(masks):
        return
    vertices = metrics._pixel_vertices([(maps, masks)], bucket_bits=bucket_bits)
    got = metrics._curve_metrics(vertices, "pixel")
    assert_close(got, sklearn_metrics(masks.ravel(), maps.ravel(), "pixel"))


@settings(max_examples=60, deadline=None)
@given(maps_and_masks(max_side=5), st.sampled_from([None, 2]))
def test_aupro_matches_plain_reference(case, bucket_bits):
    maps, masks = case
    if not two_class(masks):
        return
    vertices = metrics._pixel_vertices([(maps, masks)], bucket_bits=bucket_bits)
    assert metrics._aupro(vertices) == pytest.approx(reference_aupro(maps, masks), abs=TOL)


def blob_case(n_images: int = 12, side: int = 64, seed: int = 0):
    """Smooth maps with brighter blobs on half of the images; masks mark the blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    maps = ndimage.gaussian_filter(rng.normal(size=(n_images, side, side)), (0, 2, 2)).astype(np.float32)
    masks = np.zeros((n_images, side, side), dtype=bool)
    labels = np.arange(n_images) % 2 == 1
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            margin = side // 4
            cy, cx, r = rng.integers(margin, side - margin, 2).tolist() + [int(rng.integers(2, 7))]
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            masks[i] |= blob
            maps[i] += 0.3 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)).astype(np.float32)
    scores = maps.reshape(n_images, -1).max(axis=1).astype(np.float64)
    return scores, labels, maps, masks


def test_pixel_metrics_on_blobs_match_sklearn_and_reference_loop():
    scores, labels, maps, masks = blob_case()
    result = evaluate(scores, labels, maps, masks)
    assert_close(result, sklearn_metrics(masks.ravel(), maps.ravel(), "pixel"))
    assert_close(result, sklearn_metrics(labels, scores, "image"))
    small = slice(0, 4), slice(20, 40), slice(20, 44)  # a crop keeps the plain loop fast
    maps_small, masks_small = maps[small], masks[small]
    vertices = metrics._pixel_vertices([(np.ascontiguousarray(maps_small), np.ascontiguousarray(masks_small))])
    assert metrics._aupro(vertices) == pytest.approx(reference_aupro(maps_small, masks_small), abs=TOL)
    assert 0.0 < result["pixel_aupro"] < 1.0


def test_aupro_uses_eight_connected_regions():
    # (0,0) and (1,1) touch diagonally: one region of 2 pixels; (3,3) is a second region.
    maps = np.full((1, 4, 4), 0.5, dtype=np.float32)
    masks = np.zeros((1, 4, 4), dtype=bool)
    for (y, x), s in {(0, 0): 0.9, (1, 1): 0.1, (3, 3): 0.9}.items():
        maps[0, y, x], masks[0, y, x] = s, True
    # at t=0.9: FPR 0, PRO = (1/2 + 1) / 2; it stays there until FPR jumps to 1 at t=0.5
    result = evaluate(
        [0.0, 1.0], [0, 1], np.concatenate([np.zeros_like(maps), maps]), np.concatenate([np.zeros_like(masks), masks])
    )
    assert result["pixel_aupro"] == pytest.approx(0.75)


def test_aupro_perfect_and_interpolated_at_limit():
    maps = np.zeros((1, 1, 10), dtype=np.float32)
    masks = np.zeros((1, 1, 10), dtype=bool)
    masks[0, 0, :2] = True
    maps[0, 0, :2] = 1.0
    assert evaluate(
        [0.0, 1.0], [0, 1], np.concatenate([maps, maps]) * [[[0]], [[1]]], np.concatenate([masks & False, masks])
    )["pixel_aupro"] == pytest.approx(1.0)
    # region half detected at t=1 (FPR 0), fully at t=0 where FPR jumps to 1:
    # PRO(FPR) = 0.5 + 0.5 * FPR on [0, 1]; mean over [0, 0.3] = 0.5 + 0.075
    maps[0, 0, 1] = 0.0
    result = evaluate([0.0, 1.0], [0, 1], np.concatenate([maps * 0, maps]), np.concatenate([masks & False, masks]))
    assert result["pixel_aupro"] == pytest.approx(0.575)


def test_mask_encodings_and_torch_inputs_agree():
    scores, labels, maps, masks = blob_case(n_images=6, side=32, seed=1)
    expected = evaluate(scores, labels, maps, masks)
    variants = [
        (scores, labels, maps, masks.astype(np.uint8) * 255),
        (scores, labels.astype(np.int64), maps, masks.astype(np.float32)),
        (
            torch.from_numpy(scores),
            torch.from_numpy(labels),
            torch.from_numpy(maps)[:, None],
            torch.from_numpy(masks)[:, None],
        ),
        (scores, labels, torch.from_numpy(maps).to(torch.float64), torch.from_numpy(masks.astype(np.uint8))),
    ]
    for variant in variants:
        assert_same(evaluate(*variant), expected)


def test_bfloat16_maps_are_evaluated_exactly():
    _, labels, maps, masks = blob_case(n_images=4, side=16, seed=2)
    maps_bf16 = torch.from_numpy(maps).to(torch.bfloat16)
    result = evaluate(labels.astype(float), labels, maps_bf16, masks)
    assert_close(result, sklearn_metrics(masks.ravel(), maps_bf16.float().numpy().ravel(), "pixel"))


def test_evaluator_batches_equal_evaluate_and_store_copies():
    scores, labels, maps, masks = blob_case(n_images=10, side=32, seed=3)
    types = ["good" if not y else ("scratch" if i % 4 == 1 else "dent") for i, y in enumerate(labels)]
    expected = evaluate(scores, labels, maps, masks, types)
    evaluator = Evaluator()
    maps_buffer, scores_buffer = maps.copy(), scores.copy()
    for start in range(0, 10, 3):
        sl = slice(start, start + 3)
        maps_buffer[sl], scores_buffer[sl] = maps[sl], scores[sl]
        evaluator.update(scores_buffer[sl], labels[sl], maps_buffer[sl], masks[sl], types[sl])
        maps_buffer[sl] = -5.0  # a caller reusing its buffers must not change stored values
        scores_buffer[sl] = -5.0
    assert_same(evaluator.compute(), expected)
    evaluator.reset()
    with pytest.raises(ValueError, match="before any update"):
        evaluator.compute()


def test_per_defect_type_is_each_type_against_all_normal_images():
    scores, labels, maps, masks = blob_case(n_images=12, side=32, seed=4)
    types = np.array(["good"] * 12, dtype=object)
    types[labels] = ["scratch", "dent", "scratch", "hole", "dent", "scratch"]
    types[~labels] = ["ok", "good", "x", "good", "good", "good"]  # ignored for normal images
    result = evaluate(scores, labels, maps, masks, list(types))
    assert set(result["per_defect_type"]) == {"scratch", "dent", "hole"}
    for name, entry in result["per_defect_type"].items():
        keep = ~labels | (types == name)
        assert_same(entry, evaluate(scores[keep], labels[keep], maps[keep], masks[keep]))
        assert set(entry) == {
            "image_auroc",
            "image_aupr",
            "image_ap",
            "pixel_auroc",
            "pixel_aupr",
            "pixel_ap",
            "pixel_aupro",
        }


# ------------------------------------------------------------------------------ bad input


def test_shape_mismatches_raise():
    maps = np.zeros((2, 4, 4), np.float32)
    masks = np.zeros((2, 4, 4), bool)
    masks[1, 0, 0] = True
    with pytest.raises(ValueError, match="same 1-D shape"):
        evaluate([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate([0.1, 0.2], [0, 1], maps, masks[:, :3])
    with pytest.raises(ValueError, match="2 anomaly maps for 3 image scores"):
        evaluate([0.1, 0.2, 0.3], [0, 1, 1], maps, masks)
    with pytest.raises(ValueError, match=r"\(n, H, W\)"):
        evaluate([0.1, 0.2], [0, 1], maps[0], masks[0])
    with pytest.raises(ValueError, match="both anomaly_maps and masks"):
        evaluate([0.1, 0.2], [0, 1], maps)
    with pytest.raises(ValueError, match="1 defect types for 2"):
        evaluate([0.1, 0.2], [0, 1], defect_types=["a"])
    with pytest.raises(ValueError, match="differ in size"):
        pr_curve([0.1, 0.2], [0, 1, 1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_and_maps_raise(bad):
    with pytest.raises(ValueError, match="image_scores contains"):
        evaluate([0.1, bad], [0, 1])
    maps = np.zeros((2, 3, 3), np.float32)
    maps[1, 2, 2] = bad
    masks = np.zeros((2, 3, 3), bool)
    masks[1, 0, 0] = True
    with pytest.raises(ValueError, match="anomaly_maps contains"):
        evaluate([0.1, 0.2], [0, 1], maps, masks)
    with pytest.raises(ValueError, match="scores contains"):
        roc_curve([0.1, bad], [0, 1])


@pytest.mark.parametrize("values", [[0, 1, 255], [0, 2], [0, 0.5], [-1, 0, 1], [0, 254]])
def test_non_binary_masks_raise(values):
    masks = np.zeros((2, 3, 3), dtype=np.float32)
    masks.flat[: len(values)] = values
    with pytest.raises(ValueError, match="masks must be binary"):
        evaluate([0.1, 0.2], [0, 1], np.zeros((2, 3, 3), np.float32), masks)


def test_non_binary_labels_raise():
    with pytest.raises(ValueError, match="image_labels must be binary"):
        evaluate([0.1, 0.2, 0.3], [0, 1, 2])


def test_single_class_raises():
    with pytest.raises(ValueError, match="only normal samples"):
        evaluate([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="only anomalous samples"):
        evaluate([0.1, 0.2], [True, True])
    maps = np.zeros((2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="all 18 pixels are normal"):
        evaluate([0.1, 0.2], [0, 1], maps, np.zeros((2, 3, 3), bool))
    with pytest.raises(ValueError, match="all 18 pixels are anomalous"):
        evaluate([0.1, 0.2], [0, 1], maps, np.ones((2, 3, 3), bool))


def test_defect_type_without_mask_pixels_gets_nan_pixel_metrics():
    masks = np.zeros((3, 3, 3), bool)
    masks[1, 0, 0] = True  # type "dent" has an anomalous image without any mask pixel
    maps = np.random.default_rng(0).random((3, 3, 3)).astype(np.float32)
    result = evaluate([0.1, 0.2, 0.3], [0, 1, 1], maps, masks, ["good", "scratch", "dent"])
    dent = result["per_defect_type"]["dent"]
    assert all(np.isnan(dent[key]) for key in ("pixel_auroc", "pixel_aupr", "pixel_ap", "pixel_aupro"))
    assert dent["image_auroc"] == 1.0
    assert not np.isnan(result["per_defect_type"]["scratch"]["pixel_auroc"])


def test_evaluator_rejects_inconsistent_updates():
    evaluator = Evaluator()
    maps = np.zeros((2, 3, 3), np.float32)
    masks = np.zeros((2, 3, 3), bool)
    evaluator.update([0.1, 0.2], [0, 1], maps, masks)
    with pytest.raises(ValueError, match="same inputs"):
        evaluator.update([0.1, 0.2], [0, 1])


def test_evaluator_pools_batches_of_different_map_sizes():
    scores_a, labels_a, maps_a, masks_a = blob_case(n_images=4, side=32, seed=5)
    scores_b, labels_b, maps_b, masks_b = blob_case(n_images=4, side=20, seed=6)
    evaluator = Evaluator()
    evaluator.update(scores_a, labels_a, maps_a, masks_a)
    evaluator.update(
        torch.from_numpy(scores_b), torch.from_numpy(labels_b), torch.from_numpy(maps_b), torch.from_numpy(masks_b)
    )
    pooled_maps = np.concatenate([maps_a.ravel(), maps_b.ravel()])
    pooled_masks = np.concatenate([masks_a.ravel(), masks_b.ravel()])
    result = evaluator.compute()
    assert_close(result, sklearn_metrics(pooled_masks, pooled_maps, "pixel"))
    assert_close(result, sklearn_metrics(np.r_[labels_a, labels_b], np.r_[scores_a, scores_b], "image"))


def test_pixel_metrics_with_heavy_ties_match_sklearn():
    """Quantised maps (few distinct values, every pixel tied with a positive score)."""
    scores, labels, maps, masks = blob_case(n_images=8, side=48, seed=7)
    quantised = np.round(maps * 8).astype(np.float32) / np.float32(8)
    result = evaluate(scores, labels, quantised, masks)
    assert_close(result, sklearn_metrics(masks.ravel(), quantised.ravel(), "pixel"))
    crop_maps = np.ascontiguousarray(quantised[:2, 10:30, 10:30])
    crop_masks = np.ascontiguousarray(masks[:2, 10:30, 10:30])  # holds both classes (seed 7)
    vertices = metrics._pixel_vertices([(crop_maps, crop_masks)])
    assert metrics._aupro(vertices) == pytest.approx(reference_aupro(crop_maps, crop_masks), abs=TOL)
