"""Weights by name (``--weights imagenet`` / torchvision names) from a temporary torch.hub cache,
provenance records, the random-init warning and architecture-mismatch errors. No test here may
open a network socket: every connection attempt fails and is recorded."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import _toy_method
import pytest
import torch
import yaml
from torchvision.models import resnet18

from spotdiff.cli import main
from spotdiff.data.synth import generate
from spotdiff.detect import Detector
from spotdiff.detect.store import CONFIG_FILE, MANIFEST_FILE
from spotdiff.errors import ConfigError, WeightsError
from spotdiff.files import sha256_file
from spotdiff.models import build_backbone, load_weights
from spotdiff.progress import set_quiet

# torchvision's exact file names (the SHA-256 prefix is part of the name), written out here on purpose
# so that a change in how spotdiff derives the cache path is caught.
R18_FILE = "resnet18-f37072fd.pth"
R18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
R50_FILE = "resnet50-11ad3fa6.pth"  # ResNet50_Weights.IMAGENET1K_V2 = torchvision's DEFAULT


@pytest.fixture(autouse=True)
def no_network(monkeypatch) -> list[tuple]:
    """Make every socket connection fail; returns the list of attempted connections."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture(autouse=True)
def _not_quiet_afterwards():
    """``main(["--quiet", ...])`` sets a process-wide flag; put it back for the tests that follow."""
    yield
    set_quiet(False)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch.hub checkpoint folder under a temporary TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would override TORCH_HOME
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def r18_state() -> dict[str, torch.Tensor]:
    """A seeded random resnet18 state_dict (stands in for torchvision's ImageNet file)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return resnet18().state_dict()


@pytest.fixture
def untrusted(hub, r18_state) -> Path:
    """A stand-in for torchvision's file: its SHA-256 does not start with the f37072fd of its name."""
    path = hub / R18_FILE
    torch.save(r18_state, path)
    return path


@pytest.fixture
def cached(untrusted, monkeypatch) -> Path:
    """The stand-in, taken for torchvision's genuine file: the hash its name carries is made to be its own
    (a real SHA-256 prefix cannot be forged in a test)."""
    from spotdiff.models import backbones

    real = hashlib.sha256(untrusted.read_bytes()).hexdigest()[:8]
    monkeypatch.setattr(backbones, "name_hash", lambda path: real if path.name == R18_FILE else "")
    return untrusted


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One tiny synthetic object (32 px)."""
    return generate(tmp_path_factory.mktemp("synth") / "visa", seed=0, scale=0.25, image_size=32, objects=["pcb_synth"])


def fit_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--quiet",
        "fit",
        "--model",
        "padim",
        "--data",
        str(root),
        "--object",
        "pcb_synth",
        "--arch",
        "resnet18",
        "--d",
        "10",
        "--image-size",
        "32",
        "--out",
        str(out),
        *extra,
    ]


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


# ----------------------------------------------------------------------------- loading by name
@pytest.mark.parametrize("name", ["imagenet", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_names_load_the_cached_file_without_network(cached, r18_state, no_network, name):
    model = build_backbone("resnet18", name)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in r18_state.items() if not k.startswith("fc."))
    record = load_weights("resnet18", name).record()
    assert record == {
        "name": "ResNet18_Weights.IMAGENET1K_V1",
        "file": str(cached),
        "sha256": hashlib.sha256(cached.read_bytes()).hexdigest(),
        "verified": True,
    }
    assert no_network == []


def test_a_cached_file_not_matching_its_name_is_never_recorded_as_torchvision(
    untrusted, root, tmp_path, capsys, no_network
):
    """One warning naming the file and both hashes; recorded as an unverified file; --strict-weights refuses it."""
    actual = sha256_file(untrusted)
    assert not actual.startswith("f37072fd")
    loaded = load_weights("resnet18", "imagenet")
    assert loaded.record() == {"name": "file", "file": str(untrusted), "sha256": actual, "verified": False}
    found = warnings_in(capsys.readouterr().err)
    assert len(found) == 1 and str(untrusted) in found[0] and actual[:8] in found[0] and "f37072fd" in found[0]
    model_dir = tmp_path / "m"
    assert main(fit_argv(root, model_dir, "--weights", "imagenet")) == 0
    assert len(warnings_in(capsys.readouterr().err)) == 1
    assert json.loads((model_dir / CONFIG_FILE).read_text())["weights"]["verified"] is False
    assert main(fit_argv(root, tmp_path / "strict", "--weights", "imagenet", "--strict-weights")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--strict-weights" in err and str(untrusted) in err, err
    assert not (tmp_path / "strict").exists() and no_network == []


def test_unknown_names_list_the_choices(hub, capsys, tmp_path):
    for name, arch in (
        ("imagnet", "resnet18"),
        ("IMAGENET1K_V2", "resnet18"),
        ("ResNet50_Weights.IMAGENET1K_V2", "resnet18"),
        ("IMAGENET1K_V3", "resnet50"),
    ):
        argv = [
            "--quiet",
            "fit",
            "--model",
            "padim",
            "--data",
            str(tmp_path),
            "--object",
            "x",
            "--arch",
            arch,
            "--weights",
            name,
            "--out",
            str(tmp_path / "m"),
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and repr(name) in err, err
        assert "choose random, imagenet, IMAGENET1K_V1" in err and "weights file" in err
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- fit / test records
def test_fit_records_the_weights_and_test_shows_them(cached, root, tmp_path, capsys, no_network):
    model_dir = tmp_path / "m"
    assert main(fit_argv(root, model_dir, "--weights", "imagenet")) == 0
    assert warnings_in(capsys.readouterr().err) == []
    record = json.loads((model_dir / CONFIG_FILE).read_text())["weights"]
    assert record == {
        "name": "ResNet18_Weights.IMAGENET1K_V1",
        "file": str(cached),
        "sha256": sha256_file(cached),
        "verified": True,
    }
    results = tmp_path / "r"
    assert (
        main(["--quiet", "test", str(model_dir), "--data", str(root), "--object", "pcb_synth", "--out", str(results)])
        == 0
    )
    out = capsys.readouterr().out
    assert f"backbone weights: ResNet18_Weights.IMAGENET1K_V1 ({cached}, sha256 {record['sha256'][:12]})" in out
    assert json.loads((results / "metrics.json").read_text())["weights"] == record
    assert no_network == []


def test_model_dirs_without_a_record_still_load(root, tmp_path, capsys):
    model_dir = tmp_path / "m"
    assert main(fit_argv(root, model_dir, "--weights", "random")) == 0
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    assert config["weights"] == {"name": "random", "file": None, "sha256": "random"}
    del config["weights"]  # as written by spotdiff before weights records
    (model_dir / CONFIG_FILE).write_text(json.dumps(config))
    manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    manifest["files"][CONFIG_FILE] = sha256_file(model_dir / CONFIG_FILE)
    (model_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert Detector.load(model_dir).weights_record_ == {"name": "random", "file": None, "sha256": "random"}


# ----------------------------------------------------------------------------- the random-init warning
def test_random_init_warning_appears_exactly_when_it_should(cached, root, tmp_path, capsys):
    cases = {(): 1, ("--weights", "random"): 0, ("--weights", "imagenet"): 0}
    for i, (extra, expected) in enumerate(cases.items()):
        assert main(fit_argv(root, tmp_path / f"m{i}", *extra)) == 0
        found = warnings_in(capsys.readouterr().err)
        assert len(found) == expected, (extra, found)
        if found:
            assert "randomly initialised" in found[0] and "--weights imagenet" in found[0]
    base = [
        "--quiet",
        "finetune",
        "--task",
        "cls",
        "--protocol",
        "5shot",
        "--data",
        str(root),
        "--object",
        "pcb_synth",
        "--arch",
        "resnet18",
        "--seeds",
        "1",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    for i, (extra, expected) in enumerate(cases.items()):
        out = tmp_path / f"ft{i}"
        assert main([*base, *extra, "--out", str(out)]) == 0
        assert len(warnings_in(capsys.readouterr().err)) == expected, extra
        results = json.loads((out / "results.json").read_text())
        assert results["weights"]["name"] == (
            "random" if expected or extra[1] == "random" else "ResNet18_Weights.IMAGENET1K_V1"
        )


# ----------------------------------------------------------------------------- bad cache files, no network
def _commands(root: Path, images: Path, tmp_path: Path, arch: str) -> dict[str, list[str]]:
    bench = tmp_path / "bench.yaml"
    bench.write_text(
        yaml.safe_dump(
            {
                "data": {"root": str(root)},
                "objects": ["pcb_synth"],
                "weights": [{"name": "imagenet", "arch": arch, "file": "imagenet"}],
                "downstream": [{"method": "padim"}],
            }
        )
    )
    return {
        "fit": [
            "fit",
            "--model",
            "padim",
            "--data",
            str(root),
            "--object",
            "pcb_synth",
            "--arch",
            arch,
            "--weights",
            "imagenet",
            "--image-size",
            "32",
            "--out",
            str(tmp_path / "out"),
        ],
        "finetune": [
            "finetune",
            "--task",
            "cls",
            "--protocol",
            "5shot",
            "--data",
            str(root),
            "--object",
            "pcb_synth",
            "--arch",
            arch,
            "--weights",
            "imagenet",
            "--seeds",
            "1",
            "--steps",
            "1",
            "--image-size",
            "32",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
        ],
        "pretrain": [
            "pretrain",
            "--method",
            "simsiam",
            "--arch",
            arch,
            "--weights",
            "imagenet",
            "--data",
            str(images),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--image-size",
            "32",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "out"),
        ],
        "benchmark": ["benchmark", "--config", str(bench), "--out", str(tmp_path / "out")],
    }


@pytest.mark.parametrize("case", ["empty", "truncated", "other-arch"])
def test_bad_cache_fails_in_one_line_before_any_output(hub, root, tmp_path, capsys, case, no_network, r18_state):
    arch = "resnet18"
    if case == "truncated":
        torch.save(r18_state, hub / R18_FILE)
        data = (hub / R18_FILE).read_bytes()
        (hub / R18_FILE).write_bytes(data[: len(data) // 2])
    elif case == "other-arch":  # resnet18 tensors under the name of resnet50's default weights
        arch = "resnet50"
        torch.save(r18_state, hub / R50_FILE)
    images = _toy_method.make_images(tmp_path / "images", n=4, size=32)
    for command, argv in _commands(root, images, tmp_path, arch).items():
        assert main(["--quiet", *argv]) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, (command, err)
        assert err.startswith(f"spotdiff {command}: error: ") and "Traceback" not in err
        if case == "empty":
            assert f"download {R18_URL} and put it in {hub}/ as {R18_FILE}" in err, err
        elif case == "truncated":
            assert str(hub / R18_FILE) in err and "cannot read weights" in err and "damaged" in err, err
        else:
            assert "are resnet18 weights, they do not fit resnet50" in err, err
        assert not (tmp_path / "out").exists(), command
    assert (len(no_network) > 0) == (case == "empty")  # a download is tried only when nothing is cached
    left = {"empty": [], "truncated": [R18_FILE], "other-arch": [R50_FILE]}[case]
    assert sorted(p.name for p in hub.iterdir()) == left  # no partial download, the bad file is not removed


# ----------------------------------------------------------------------------- SPD from a pre-trained start
def test_pretrain_starts_from_the_named_weights(cached, r18_state, tmp_path, monkeypatch, no_network):
    from spotdiff.pretrain import train

    seen: list[dict[str, torch.Tensor]] = []
    original = train._forward_backward

    def spy(model, *args, **kwargs):
        if not seen:
            seen.append({k: v.detach().clone() for k, v in model.backbone.state_dict().items()})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(train, "_forward_backward", spy)
    images = _toy_method.make_images(tmp_path / "images", n=8, size=32)
    run = tmp_path / "run"
    assert (
        main(
            [
                "--quiet",
                "pretrain",
                "--method",
                "simsiam",
                "--spd",
                "--arch",
                "resnet18",
                "--weights",
                "imagenet",
                "--data",
                str(images),
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--image-size",
                "32",
                "--workers",
                "0",
                "--lr",
                "0.01",
                "--out",
                str(run),
                "--set",
                "hparams.blend_area=[0.04, 0.08]",
                "--set",
                "hparams.blend_aspect=[0.5, 2.0]",
            ]
        )
        == 0
    )  # SmoothBlend at 32 px
    first = seen[0]
    body = {k: v for k, v in r18_state.items() if not k.startswith("fc.")}
    assert first.keys() == body.keys() and all(torch.equal(first[k], v) for k, v in body.items())
    assert json.loads((run / "weights.json").read_text()) == {
        "name": "ResNet18_Weights.IMAGENET1K_V1",
        "file": str(cached),
        "sha256": sha256_file(cached),
        "verified": True,
    }
    assert no_network == []


def test_weights_object_of_another_architecture_is_refused(cached):
    with pytest.raises(WeightsError, match="loaded for resnet18, not resnet50"):
        build_backbone("resnet50", load_weights("resnet18", "imagenet"))


@pytest.mark.slow  # the whole demo pipeline at 32 px: about 25 s on the loaded 2-core machine
def test_demo_adds_the_named_backbone(cached, tmp_path, no_network):
    from spotdiff.bench.demo import BACKBONES, DemoSettings, run_demo

    tiny = DemoSettings(
        scale=0.1,
        data_size=32,
        image_size=32,
        pretrain_size=72,
        pretrain_steps=1,
        pretrain_batch=4,
        padim_batch=8,
        gallery_size=2,
    )
    result = run_demo(tiny, tmp_path / "demo", weights="imagenet")
    label = "ResNet18_Weights.IMAGENET1K_V1"
    assert list(dict.fromkeys(r.method for r in result.records)) == [*BACKBONES, label]
    results = json.loads((result.out / "results.json").read_text())
    assert results["extra_weights"] == {
        "name": label,
        "file": str(cached),
        "sha256": sha256_file(cached),
        "verified": True,
    }
    assert f"extra backbone {label}" in result.report.read_text()
    assert no_network == []


class _LocalWeights:
    """Stands in for a torchvision weights entry whose URL is a local ``file://`` URL (no socket)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __str__(self) -> str:
        return "Local_Weights.TEST"


def test_download_goes_to_the_cache_and_checks_the_hash_prefix(hub, r18_state, tmp_path, no_network):
    from spotdiff.models.backbones import fetch_torchvision_weights

    source = tmp_path / "server"
    source.mkdir()
    blob = source / "blob.pth"
    torch.save(r18_state, blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    good = source / f"resnet18-{digest[:8]}.pth"
    blob.rename(good)
    path = fetch_torchvision_weights(_LocalWeights(good.as_uri()))
    assert path == hub / good.name and path.read_bytes() == good.read_bytes()
    bad = source / f"resnet18-{'0' if digest[0] != '0' else '1'}{digest[1:8]}.pth"  # wrong prefix
    good.rename(bad)
    with pytest.raises(WeightsError, match="does not match the SHA-256 prefix"):
        fetch_torchvision_weights(_LocalWeights(bad.as_uri()))
    assert sorted(p.name for p in hub.iterdir()) == [good.name]  # the bad download is not kept
    assert no_network == []


def test_benchmark_warns_once_per_weights_entry_without_a_file(cached, tmp_path, capsys):
    from spotdiff.bench.config import parse_config
    from spotdiff.bench.grid import check_weights

    entries = [
        {"name": "bare", "arch": "resnet18"},
        {"name": "explicit", "arch": "resnet18", "file": "random"},
        {"name": "inet", "arch": "resnet18", "file": "imagenet"},
    ]
    config = parse_config(
        {"data": {"root": "data"}, "objects": ["a", "b"], "weights": entries, "downstream": [{"method": "padim"}]},
        tmp_path,
    )
    assert [w.file for w in config.weights] == [None, "random", "imagenet"]  # names are not made paths
    check_weights(config)
    found = warnings_in(capsys.readouterr().err)
    assert len(found) == 1 and "'bare'" in found[0] and "file: imagenet" in found[0]
    with pytest.raises(ConfigError, match="'IMAGENET1K_V2' do not exist for resnet18"):
        parse_config(
            {
                "data": {"root": "data"},
                "objects": ["a"],
                "downstream": [{"method": "padim"}],
                "weights": [{"name": "x", "arch": "resnet18", "file": "IMAGENET1K_V2"}],
            },
            tmp_path,
        )


def test_benchmark_cells_record_the_resolved_torchvision_weights(cached, tmp_path, monkeypatch, capsys, no_network):
    from spotdiff.bench.cells import DOWNSTREAM
    from spotdiff.bench.config import load_config
    from spotdiff.bench.grid import run_benchmark
    from spotdiff.bench.schema import CellOutput

    given = []

    def runner(cell, config, work_dir):
        given.append(cell.weights_file)
        build_backbone(cell.weights.arch, cell.weights_file)  # what the real runners do with it
        return CellOutput({"image_auroc": 0.5})

    monkeypatch.setitem(DOWNSTREAM, "probe", runner)
    bench = tmp_path / "bench.yaml"
    bench.write_text(
        yaml.safe_dump(
            {
                "data": {"root": "data"},
                "objects": ["a"],
                "downstream": [{"method": "probe"}],
                "weights": [{"name": "inet", "arch": "resnet18", "file": "imagenet"}],
            }
        )
    )
    out = tmp_path / "out"
    run_benchmark(load_config(bench), out)
    assert given == ["ResNet18_Weights.IMAGENET1K_V1"]
    cell = json.loads((out / "cells" / "inet__probe__a.json").read_text())
    assert cell["fingerprint"]["weights_file"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert cell["init_weights"] == {
        "name": "ResNet18_Weights.IMAGENET1K_V1",
        "file": str(cached),
        "sha256": sha256_file(cached),
        "verified": True,
    }
    assert "inet (resnet18): ResNet18_Weights.IMAGENET1K_V1 (" in (out / "report.html").read_text()
    assert warnings_in(capsys.readouterr().err) == [] and no_network == []


def test_unknown_architecture_is_one_config_error_everywhere(tmp_path):
    """Backbones, weights, detectors and fine-tuning all refuse an unknown architecture the same way."""
    from spotdiff.detect import PaDiM
    from spotdiff.finetune.train import FinetuneConfig
    from spotdiff.models import layer_channels

    message = r"unknown architecture 'vgg16'; choose one of \['resnet18', 'resnet50', 'wide_resnet50_2'\]"
    calls = [
        lambda: build_backbone("vgg16"),
        lambda: load_weights("vgg16", "imagenet"),
        lambda: layer_channels("vgg16", ["layer2"]),
        lambda: PaDiM(arch="vgg16").check_params(),
        lambda: FinetuneConfig(task="cls", protocol="highshot", data=tmp_path, out=tmp_path, arch="vgg16").validate(),
    ]
    for call in calls:
        with pytest.raises(ConfigError, match=message):
            call()
