"""Parallel decoding (spotdiff.data.loader): same items, same order, same tensors as serial decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from spotdiff.data import open_dataset
from spotdiff.data.loader import batches, decode_workers, ordered_map
from spotdiff.data.synth import generate
from spotdiff.detect import PaDiM
from spotdiff.detect.evaluate import evaluate_detector
from spotdiff.detect.predict import predict_images
from spotdiff.errors import ConfigError


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory):
    """A tiny synth object written at 120 x 90 px, read back at 64 px (decode + antialiased resize)."""
    return generate(
        tmp_path_factory.mktemp("loader") / "synth",
        seed=1,
        scale=0.05,
        image_size=48,
        objects=["cashew_synth"],
        normal=9,
        frame=(120, 90),
    )


def test_ordered_map_keeps_order_and_raises_in_turn():
    assert list(ordered_map(lambda x: x * x, range(50), workers=3, ahead=2)) == [x * x for x in range(50)]

    def fail_at_7(x: int) -> int:
        if x == 7:
            raise ValueError("bad item 7")
        return x

    got = []
    with pytest.raises(ValueError, match="bad item 7"):
        for value in ordered_map(fail_at_7, range(20), workers=2):
            got.append(value)
    assert got == list(range(7))


def test_decode_workers_default_and_bad_value():
    assert 0 <= decode_workers() <= 4 and decode_workers(3) == 3
    with pytest.raises(ConfigError, match="workers must be >= 0"):
        decode_workers(-1)


@pytest.mark.parametrize("subset", ["train", "test"])
def test_threaded_batches_equal_serial_batches(large_jpegs, subset):
    data = open_dataset(large_jpegs, "cashew_synth", subset=subset, image_size=64)
    serial = list(batches(data, 3, workers=0))
    threaded = list(batches(data, 3, workers=3))
    assert len(serial) == len(threaded) == -(-len(data) // 3)
    for a, b in zip(serial, threaded, strict=True):
        assert a.keys() == b.keys() and a["path"] == b["path"]
        for key in ("image", "mask", "class_mask", "label"):
            assert torch.equal(a[key], b[key])


def test_fit_test_predict_identical_with_decoding_threads(large_jpegs, tmp_path):
    train = open_dataset(large_jpegs, "cashew_synth", subset="train", image_size=64)
    test = open_dataset(large_jpegs, "cashew_synth", subset="test", image_size=64)
    models = [PaDiM(arch="resnet18", d=16, num_workers=w).fit(train) for w in (0, 2)]
    assert torch.equal(models[0].mean_, models[1].mean_)
    assert torch.equal(models[0].inv_chol_packed_, models[1].inv_chol_packed_)
    runs = [evaluate_detector(models[0], test, num_workers=w) for w in (0, 2)]
    assert runs[0][1] == runs[1][1] and np.array_equal(runs[0][2], runs[1][2])
    folder = large_jpegs / "cashew_synth" / "Data" / "Images" / "Anomaly"
    (tmp_path / "broken.JPG").write_bytes(b"\xff\xd8 not a jpeg")
    Image.new("L", (33, 21), 90).save(tmp_path / "gray.png")
    records = [
        predict_images(
            models[0],
            [folder, tmp_path / "broken.JPG", tmp_path / "gray.png"],
            tmp_path / f"out{w}",
            batch_size=2,
            overlays=False,
            num_workers=w,
        )
        for w in (0, 3)
    ]
    assert [r["score"] for r in records[0]] == [r["score"] for r in records[1]]
    assert records[0][-2]["error"] and records[1][-2]["error"] == records[0][-2]["error"]


def test_image_to_tensor_resizes_whole_grey_levels_close_to_a_float_resize():
    """The uint8 resize (Pillow's, the one decoder) differs from a float resize by at most one grey level."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from spotdiff.data.transforms import image_to_tensor

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(150, 100, 3), dtype=np.uint8))
    got = image_to_tensor(img, (32, 48))
    float_resize = F.resize(
        F.to_dtype(F.pil_to_tensor(img), torch.float32, scale=True),
        [32, 48],
        interpolation=InterpolationMode.BILINEAR,
        antialias=True,
    )
    assert got.dtype == torch.float32 and got.shape == (3, 32, 48)
    assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0
    torch.testing.assert_close(got * 255, (got * 255).round(), rtol=0, atol=1e-4)  # whole grey levels
    assert float((got - float_resize).abs().max()) <= 1.0 / 255 + 1e-6
    assert torch.equal(image_to_tensor(img), F.to_dtype(F.pil_to_tensor(img), torch.float32, scale=True))
