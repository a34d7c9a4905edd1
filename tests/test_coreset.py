"""Greedy k-center (spotdiff.detect.coreset): the same indices as the plain loop, ties included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from detect_fakes import square_images

from spotdiff.detect.coreset import CoresetStats, greedy_k_center
from spotdiff.detect.features import patchcore_embedding
from spotdiff.detect.patchcore import greedy_coreset, random_projection
from spotdiff.errors import ConfigError
from spotdiff.models import build_backbone

MAGNETIC_TILE = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "magnetic_tile"


def reference_greedy(z: torch.Tensor, n_select: int, first: int) -> list[int]:
    """The plain greedy k-center loop, written for clarity, not speed.

    ``nearest[p]`` is the squared distance of row ``p`` to its nearest chosen centre, summed in
    float64 from the differences; the next centre is the row with the largest one, and
    ``torch.argmax`` returns the first (lowest) index among equal maxima.
    """
    z = z.double()
    nearest = torch.full((len(z),), float("inf"), dtype=torch.float64)
    chosen, current = [], first
    for _ in range(n_select):
        chosen.append(current)
        nearest = torch.minimum(nearest, ((z - z[current]) ** 2).sum(1))
        current = int(torch.argmax(nearest))
    return chosen


def gaussian(m: int, dim: int, seed: int) -> torch.Tensor:
    """Float32 Gaussian rows with an offset (the screen centres them; the reference does not)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, dim, generator=g) * 2.0 + 10.0


@pytest.mark.parametrize(
    ("m", "dim", "n_select", "candidates"),
    [(1, 3, 1, 1024), (50, 2, 50, 1024), (700, 8, 70, 1024), (2000, 128, 200, 64), (3000, 16, 300, 1)],
)
@pytest.mark.parametrize("screen_dtype", [torch.float64, torch.float32])
def test_random_rows_equal_plain_loop(m, dim, n_select, candidates, screen_dtype):
    z = gaussian(m, dim, seed=m)
    first = m // 3
    got = greedy_k_center(z, n_select, first, candidates=candidates, screen_dtype=screen_dtype)
    assert got.dtype == torch.int64
    assert got.tolist() == reference_greedy(z, n_select, first)


@pytest.mark.parametrize("screen_dtype", [torch.float64, torch.float32])
def test_ties_go_to_the_lowest_index(screen_dtype):
    """Rows on a small integer lattice: every distance is exact in float32 and most are tied."""
    g = torch.Generator().manual_seed(0)
    z = torch.randint(0, 3, (600, 5), generator=g).float()  # 243 distinct points, many repeats
    stats = CoresetStats()
    got = greedy_k_center(z, 200, 5, candidates=64, screen_dtype=screen_dtype, stats=stats)
    assert got.tolist() == reference_greedy(z, 200, 5)
    assert stats.exact_decisions > 0  # the ties were decided by the exact rule


def test_more_centres_than_distinct_rows_repeat_the_plain_loop():
    """Once every row is a centre all distances are 0 and the plain loop picks row 0 again and again."""
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    got = greedy_k_center(z, 5, 1)
    assert got.tolist() == reference_greedy(z, 5, 1) == [1, 4, 0, 0, 0]


def test_float32_screen_uses_the_exact_rule_and_agrees():
    """The float32 screen's bounds overlap often on clustered rows; decisions stay exact."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(20, 32, generator=g) * 50
    z = (centres[torch.randint(20, (4000,), generator=g)] + torch.randn(4000, 32, generator=g)).float()
    stats64, stats32 = CoresetStats(), CoresetStats()
    got64 = greedy_k_center(z, 400, 0, screen_dtype=torch.float64, stats=stats64)
    got32 = greedy_k_center(z, 400, 0, screen_dtype=torch.float32, stats=stats32)
    assert got64.tolist() == got32.tolist() == reference_greedy(z, 400, 0)
    assert stats32.exact_decisions > stats64.exact_decisions


def _patch_features(images: torch.Tensor) -> torch.Tensor:
    """``(N * h * w, 384)`` PatchCore patch features (random-init ResNet-18, layer2 + layer3)."""
    net = build_backbone("resnet18").eval()  # random init from the seed the conftest fixture sets
    with torch.inference_mode():
        emb = patchcore_embedding(net, images, ["layer2", "layer3"], None)
    return emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).contiguous()


def _magnetic_tile_images(n: int) -> torch.Tensor:
    if not (MAGNETIC_TILE / "MT_Free" / "Imgs").is_dir():
        pytest.skip(f"magnetic-tile dataset not found at {MAGNETIC_TILE}")
    from spotdiff.data import open_magnetic_tile
    from spotdiff.data.transforms import normalize

    train = open_magnetic_tile(MAGNETIC_TILE, "train", image_size=128, seed=0)
    return normalize(torch.stack([train[i]["image"] for i in range(n)]))


@pytest.mark.parametrize(
    ("source", "n_images", "projection_dim", "ratio"),
    [("magnetic_tile", 12, 128, 0.1), ("magnetic_tile", 4, None, 0.25), ("synthetic", 8, 128, 0.1)],
)
def test_patch_features_equal_plain_loop(source, n_images, projection_dim, ratio):
    """PatchCore's coreset on real patch features (projected as in fit, or not) is the plain loop's."""
    images = _magnetic_tile_images(n_images) if source == "magnetic_tile" else square_images(n_images, size=128)
    features = _patch_features(images)
    n_select = int(len(features) * ratio)
    got = greedy_coreset(features, n_select, projection_dim, seed=1)
    space = features if projection_dim is None else random_projection(features, projection_dim, seed=1)
    first = int(torch.randint(len(features), (1,), generator=torch.Generator().manual_seed(1)))
    assert got.tolist() == reference_greedy(space, n_select, first)


def test_two_threads_larger_tiles_same_selection():
    """With more than one thread the screen uses larger tiles; the choice stays the plain loop's."""
    z = gaussian(3000, 16, seed=5)
    expected = reference_greedy(z, 300, 11)
    torch.set_num_threads(2)  # the autouse fixture sets one thread again for the next test
    assert greedy_k_center(z, 300, 11, candidates=128).tolist() == expected


def test_bad_input_is_refused():
    z = torch.randn(10, 3)
    with pytest.raises(ConfigError, match="cannot select 11 of 10"):
        greedy_k_center(z, 11, 0)
    with pytest.raises(ConfigError, match="first centre 10"):
        greedy_k_center(z, 2, 10)
    z[4, 1] = float("nan")
    with pytest.raises(ConfigError, match="NaN or infinite"):
        greedy_k_center(z, 2, 0)
