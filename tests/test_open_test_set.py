"""`detect.evaluate.open_test_set`: the checks `spotdiff test` used to make in the CLI, now a library
function (issue 24 item 4): refusals, the two warnings, and the images it opens."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from spotdiff.detect.evaluate import open_test_set
from spotdiff.errors import ConfigError, DataError


def _model(**source):  # the two attributes open_test_set reads of a fitted detector
    return SimpleNamespace(image_size_=(32, 48), data_source_=source)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"good": ["g"]}, "needs both --good DIR and --bad DIR"),
        ({"bad": ["b"]}, "needs both --good DIR and --bad DIR"),
        ({}, "give --good DIR --bad DIR (plain folders) or --data ROOT with --object NAME"),
        ({"data": "d"}, "or --data ROOT with --object NAME"),
        ({"data": "d", "object": "o", "mask_suffix": "_m"}, "are for plain folders"),
        ({"data": "d", "object": "o", "masks": ["m"]}, "are for plain folders"),
    ],
)
def test_refuses_incomplete_or_mixed_sources(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_test_set(_model(), "m", **kwargs)


def test_warns_about_another_object_and_another_split_seed(tmp_path, caplog):
    model = _model(object="pcb1", split_seed=3)
    with caplog.at_level(logging.WARNING, logger="spotdiff"), pytest.raises(DataError):
        open_test_set(model, "models/m", data=tmp_path / "missing", object="pcb2", split_seed=4)
    texts = [r.getMessage() for r in caplog.records if r.name == "spotdiff.detect.evaluate"]
    assert texts[0].startswith("warning: models/m was fitted on object 'pcb1', not 'pcb2'")
    assert texts[1].startswith("warning: --split-seed 4 differs from the seed the model was fitted with (3)")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spotdiff"), pytest.raises(DataError):
        open_test_set(model, "models/m", data=tmp_path / "missing", object="pcb1")  # recorded seed by default
    assert [r for r in caplog.records if r.name == "spotdiff.detect.evaluate"] == []


def test_opens_plain_folders_at_the_model_size(tmp_path):
    rng = np.random.default_rng(0)
    for folder, n in (("good", 2), ("bad", 1)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    test, found = open_test_set(_model(), "m", good=[tmp_path / "good"], bad=[tmp_path / "bad"])
    assert found is not None and len(test) == 3
    assert tuple(test[0]["image"].shape) == (3, 32, 48)
    assert sorted(int(test[i]["label"]) for i in range(3)) == [0, 0, 1]


@pytest.mark.parametrize(
    ("backend", "onnx", "message"),
    [
        ("onnxruntime", None, "--backend onnxruntime needs --onnx FILE"),
        ("torch", "m.onnx", "--onnx is only used with --backend onnxruntime"),
        ("tensorrt", None, "expected torch or onnxruntime"),
    ],
)
def test_load_predictor_refuses_mismatched_backend_options(tmp_path, backend, onnx, message):
    from spotdiff.detect.predict import load_predictor

    with pytest.raises(ConfigError, match=message):
        load_predictor(tmp_path / "no-model", backend, onnx)
