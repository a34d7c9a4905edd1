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
from spotdiff.detect.predict import evaluate_detector, predict_images
from spotdiff.errors import ConfigError


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory):
    """A tiny synth object written at 120 x 90 px, read back at 64 px (decode + antialiased resize)."""
    return generate(tmp_path_factory.mktemp("loader") / "synth", seed=1, scale=0.05, image_size=48,
                    objects=["cashew_synth"], normal=9, frame=(120, 90))


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
    records = [predict_images(models[0], [folder, tmp_path / "broken.JPG", tmp_path / "gray.png"],
                              tmp_path / f"out{w}", batch_size=2, overlays=False, num_workers=w) for w in (0, 3)]
    assert [r["score"] for r in records[0]] == [r["score"] for r in records[1]]
    assert records[0][-2]["error"] and records[1][-2]["error"] == records[0][-2]["error"]
