"""The detectors follow scikit-learn's estimator conventions: parameters-only constructor, ``fit``
returns self, fitted attributes end in ``_``, ``get_params``/``set_params``/``repr``, cloning; and
the model directory format is unchanged by that (same config keys and tensor names as before)."""

from __future__ import annotations

import json

import pytest
import torch
from detect_fakes import as_dataset, square_images
from safetensors import safe_open
from sklearn.base import clone

from spotdiff.detect import DETECTORS, Detector, PaDiM, PatchCore
from spotdiff.detect.store import BACKBONE_FILE, CONFIG_FILE, MODEL_FILE
from spotdiff.errors import ConfigError, WeightsError

TINY = {
    "padim": {"arch": "resnet18", "layers": ["layer1"], "d": 8, "seed": 3},
    "patchcore": {
        "arch": "resnet18",
        "layers": ["layer1", "layer2"],
        "coreset_ratio": 0.5,
        "num_neighbors": 2,
        "seed": 3,
    },
}

# what `save` wrote before the estimator refactor (commit eb7b0d7), besides the backbone file
COMMON_KEYS = {
    "format",
    "format_version",
    "model",
    "arch",
    "layers",
    "seed",
    "image_size",
    "n_train",
    "backbone_source",
    "weights",
    "data_source",
    "normal_maps",
}
OLD_FORMAT = {
    "padim": (COMMON_KEYS | {"d", "epsilon"}, {"mean", "inv_cholesky_packed", "channel_index"}),
    "patchcore": (
        COMMON_KEYS | {"coreset_ratio", "projection_dim", "num_neighbors", "target_dim", "coreset_shard"},
        {"memory_bank"},
    ),
}


def _fit(kind: str) -> Detector:
    return DETECTORS[kind](**TINY[kind]).fit(as_dataset(square_images(3, size=32)))


def test_constructor_stores_parameters_only():
    model = PaDiM(arch="resnet18", weights="no/such/file.safetensors", d=-1, epsilon=0.0, layers=("layer9",))
    assert model.get_params() == {
        "arch": "resnet18",
        "weights": "no/such/file.safetensors",
        "layers": ("layer9",),
        "d": -1,
        "epsilon": 0.0,
        "seed": 0,
        "batch_size": 32,
        "device": "cpu",
        "num_workers": None,
    }
    assert not [name for name in vars(model) if name.endswith("_")]  # nothing fitted, no backbone built
    with pytest.raises(ConfigError, match="unknown layer"):
        model.check_params()
    with pytest.raises(ConfigError, match="d must be >= 1"):
        model.set_params(layers=["layer1"]).check_params()
    with pytest.raises(ConfigError, match="d must be >= 1"):  # fit checks before reading any image
        model.fit(as_dataset(square_images(2, size=32)))
    with pytest.raises(WeightsError):  # weights are read by fit, not by the constructor
        model.set_params(d=4, epsilon=0.01).fit(as_dataset(square_images(2, size=32)))


def test_repr_shows_the_settings():
    assert repr(PaDiM(d=20)) == (
        "PaDiM(arch='resnet18', weights=None, layers=('layer1', 'layer2', 'layer3'), d=20, "
        "epsilon=0.01, seed=0, batch_size=32, device='cpu', num_workers=None)"
    )
    assert repr(PatchCore(coreset_ratio=0.25)).startswith(
        "PatchCore(arch='wide_resnet50_2', weights=None, layers=('layer2', 'layer3'), coreset_ratio=0.25,"
    )


def test_set_params_refuses_unknown_names():
    model = PatchCore()
    assert model.set_params(num_neighbors=3) is model and model.num_neighbors == 3
    with pytest.raises(ConfigError, match="PatchCore has no parameter 'k'"):
        model.set_params(k=3)


@pytest.mark.parametrize("kind", ["padim", "patchcore"])
def test_fit_returns_self_and_fitted_state_ends_in_underscore(kind):
    model = DETECTORS[kind](**TINY[kind])
    fitted = model.fit(as_dataset(square_images(3, size=32)))
    assert fitted is model and model.image_size_ == (32, 32) and model.n_train_ == 3
    public = {name for name in vars(model) if not name.startswith("_")}
    assert public - set(model.get_params()) == {name for name in public if name.endswith("_")}
    assert model.get_params() == {**DETECTORS[kind]().get_params(), **TINY[kind]}  # fit changes no parameter


@pytest.mark.parametrize("kind", ["padim", "patchcore"])
def test_clone_gives_an_unfitted_detector_with_equal_params(kind):
    fitted = _fit(kind)
    for copy in (type(fitted)(**fitted.get_params()), clone(fitted)):
        assert type(copy) is type(fitted) and copy.get_params() == fitted.get_params() and repr(copy) == repr(fitted)
        assert not [name for name in vars(copy) if name.endswith("_")]
        with pytest.raises(ConfigError, match="not fitted"):
            copy.predict(square_images(1, size=32))
    refit = clone(fitted).fit(as_dataset(square_images(3, size=32)))
    images = square_images(2, size=32, defect=True, seed=1)
    for a, b in zip(fitted.predict(images), refit.predict(images), strict=True):
        assert torch.equal(a, b)  # same params, same data: the same model


@pytest.mark.parametrize("kind", ["padim", "patchcore"])
def test_model_directory_format_is_unchanged(tmp_path, kind):
    keys, tensors = OLD_FORMAT[kind]
    out = _fit(kind).save(tmp_path / kind)
    assert set(json.loads((out / CONFIG_FILE).read_text())) == keys
    with safe_open(str(out / MODEL_FILE), "pt") as f:
        assert set(f.keys()) == tensors
    loaded = Detector.load(out)
    assert loaded.get_params()["arch"] == "resnet18" and loaded.backbone_source_ == "random init, seed 3"
    assert (out / BACKBONE_FILE).is_file()
