"""Pre-training loop: runs, logs, checkpoints, exact resume, NaN stop, config precedence, data."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _toy_method
import numpy as np
import pytest
import torch
from PIL import Image

from spotdiff.cli import main
from spotdiff.errors import ConfigError, DataError, SpotdiffError
from spotdiff.models import build_backbone
from spotdiff.pretrain import methods, train
from spotdiff.pretrain.checkpoint import load_checkpoint
from spotdiff.pretrain.config import PretrainConfig, load_config
from spotdiff.pretrain.data import EpochBatchSampler, PretrainImages, find_images
from spotdiff.schedules import warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
TOY_SCRIPT = ROOT / "tests" / "_toy_method.py"


@pytest.fixture
def toy(monkeypatch):
    """Make the loop build the stand-in method; returns the list of built methods."""
    built = []

    def build(name, **kwargs):
        method = _toy_method.build_toy_method(name, **kwargs)
        built.append(method)
        return method

    monkeypatch.setattr(train, "build_method", build)
    return built


@pytest.fixture
def images(tmp_path):
    return _toy_method.make_images(tmp_path / "images", n=12)


# SmoothBlend settings that hold their stated area and smoothness at 32 px (the defaults need 91 px)
SMALL_BLEND = {"blend_area": [0.04, 0.08], "blend_aspect": [0.5, 2.0]}


def tiny(images: Path, out: Path, **kw) -> PretrainConfig:
    values = dict(
        arch="resnet18",
        data=str(images),
        out=str(out),
        steps=6,
        image_size=32,
        workers=0,
        checkpoint_every=2,
        log_every=1,
        tensorboard=False,
    )
    values.update(kw)
    return load_config(None, values)


def read_log(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_completes_with_checkpoint_log_and_backbone(toy, images, tmp_path):
    ckpt = train.run_pretrain(tiny(images, tmp_path / "run"))
    run = tmp_path / "run"
    assert ckpt == run / "checkpoint.pt"
    payload = load_checkpoint(ckpt)
    assert payload["step"] == 6 and payload["epoch"] == 2 and payload["world_size"] == 1
    assert payload["config"]["batch_size"] == 4 and payload["config"]["optimizer"] == "sgd"
    rows = read_log(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert list(rows[0]) == list(train.LOG_COLUMNS)
    assert all(math.isfinite(float(r["loss"])) and float(r["img_per_s"]) > 0 for r in rows)
    # Warm-up over one epoch (3 steps) to the peak lr 0.05 * 4 / 256, then cosine decay.
    peak = 0.05 * 4 / 256
    assert [float(r["lr"]) for r in rows] == pytest.approx(
        [peak / 3, 2 * peak / 3, peak, peak, peak * 0.75, peak * 0.25], rel=1e-4
    )
    assert toy[0].after_steps == 6
    groups = payload["optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(peak * 0.25) and groups[1]["lr"] == pytest.approx(peak)  # fixed_lr
    # The weights changed and the exported backbone is the checkpoint's.
    fresh = build_backbone("resnet18")
    loaded = build_backbone("resnet18", weights=run / "backbone.safetensors")
    assert torch.equal(loaded.conv1.weight, payload["backbone"]["conv1.weight"])
    assert not torch.equal(fresh.layer1[0].conv1.weight, loaded.layer1[0].conv1.weight)
    assert (run / "config.yaml").is_file()


def test_lr_schedule_warmup_then_cosine():
    assert warmup_cosine(0, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine(1, 10, 2) == pytest.approx(1.0)
    assert warmup_cosine(2, 10, 2) == pytest.approx(1.0)
    assert warmup_cosine(6, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine(0, 4, 0) == pytest.approx(1.0)


def test_resume_after_interruption_is_bit_identical(toy, images, tmp_path, monkeypatch):
    reference = train.run_pretrain(tiny(images, tmp_path / "ref", spd=True))

    # Interrupted run: loads with 2 workers, dies during step 4 (checkpoint of step 2 on disk).
    def build_interrupting(name, **kwargs):
        method = _toy_method.build_toy_method(name, **kwargs)
        forward = method.forward

        def dying_forward(*args, **kw):
            if int(method.calls) == 3:
                raise KeyboardInterrupt
            return forward(*args, **kw)

        method.forward = dying_forward
        return method

    monkeypatch.setattr(train, "build_method", build_interrupting)
    with pytest.raises(KeyboardInterrupt):
        train.run_pretrain(tiny(images, tmp_path / "cut", spd=True, workers=2))
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 2
    assert [int(r["step"]) for r in read_log(tmp_path / "cut")] == [1, 2, 3]

    # Resume (with the loader in the main process this time) and finish.
    monkeypatch.setattr(train, "build_method", _toy_method.build_toy_method)
    resumed = train.run_pretrain(tiny(images, tmp_path / "cut", spd=True, resume=True))
    a, b = load_checkpoint(reference), load_checkpoint(resumed)
    assert_same_state(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    ref_rows, cut_rows = read_log(tmp_path / "ref"), read_log(tmp_path / "cut")
    assert [r["step"] for r in cut_rows] == [r["step"] for r in ref_rows]
    assert [r["loss"] for r in cut_rows] == [r["loss"] for r in ref_rows]
    assert [r["loss_spd"] for r in cut_rows] == [r["loss_spd"] for r in ref_rows]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_the_uninterrupted_result(sig, toy, images, tmp_path):
    """A real signal to the CLI process after its first checkpoint; --resume finishes exactly.

    SIGKILL loses the steps after the last checkpoint; SIGTERM checkpoints the step in progress.
    """
    reference = train.run_pretrain(tiny(images, tmp_path / "ref", steps=6, hparams={"sleep": 0.25}))
    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(TOY_SCRIPT),
        "--quiet",
        "pretrain",
        "--arch",
        "resnet18",
        "--data",
        str(images),
        "--out",
        str(run),
        "--steps",
        "6",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--checkpoint-every",
        "2",
        "--set",
        "log_every=1",
        "--set",
        "tensorboard=false",
        "--set",
        "hparams.sleep=0.25",
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (run / "checkpoint.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    killed_at = load_checkpoint(run / "checkpoint.pt")["step"]
    assert 2 <= killed_at < 6, "the run finished before it could be killed"
    if sig == signal.SIGTERM:
        assert proc.returncode == 2
        assert f"stopped by SIGTERM after step {killed_at}/6; checkpoint saved" in err.decode()
    assert not (run / "backbone.safetensors").exists()
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_same_state(load_checkpoint(reference)["model"], load_checkpoint(run / "checkpoint.pt")["model"])


def test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint(toy, images, tmp_path):
    cfg = tiny(images, tmp_path / "run", steps=8, hparams={"nan_at_step": 5})
    with pytest.raises(SpotdiffError, match=r"loss became nan at step 5 .*checkpoint\.pt"):
        train.run_pretrain(cfg)
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert payload["step"] == 4
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "backbone.safetensors").exists()


def test_existing_run_needs_resume_and_the_same_config(toy, images, tmp_path):
    train.run_pretrain(tiny(images, tmp_path / "run", steps=2))
    with pytest.raises(ConfigError, match="--resume"):
        train.run_pretrain(tiny(images, tmp_path / "run", steps=2))
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1"):
        train.run_pretrain(tiny(images, tmp_path / "run", steps=2, seed=1, resume=True))
    # Resuming a finished run changes nothing; workers may differ.
    before = (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns
    train.run_pretrain(tiny(images, tmp_path / "run", steps=2, workers=1, resume=True))
    assert (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns == before


def test_config_precedence_recipe_yaml_cli(toy, images, tmp_path):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("lr: 0.1\nbatch_size: 8\nsteps: 50\nimage_size: 32\nhparams: {sleep: 0}\n")
    run = tmp_path / "run"
    rc = main(
        [
            "--quiet",
            "pretrain",
            "--config",
            str(yaml_file),
            "--arch",
            "resnet18",
            "--data",
            str(images),
            "--out",
            str(run),
            "--lr",
            "0.2",
            "--steps",
            "1",
            "--workers",
            "0",
            "--set",
            "log_every=1",
            "--set",
            "tensorboard=false",
            "--set",
            "weight_decay=0.001",
        ]
    )
    assert rc == 0
    payload = load_checkpoint(run / "checkpoint.pt")
    saved = payload["config"]
    assert [g["weight_decay"] for g in payload["optimizer"]["param_groups"]] == [0.001, 0.001]
    assert saved["lr"] == 0.2  # CLI over YAML
    assert saved["batch_size"] == 8  # YAML over recipe (4)
    assert saved["momentum"] == 0.9 and saved["optimizer"] == "sgd"  # recipe
    assert saved["steps"] == 1 and saved["image_size"] == 32
    assert saved["hparams"] == {"sleep": 0}
    # --epochs on the command line replaces the file's steps.
    cfg = load_config(yaml_file, {"epochs": 3})
    assert cfg.epochs == 3 and cfg.steps is None and cfg.lr == 0.1


def test_config_errors_name_the_key_and_source(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'epoch' \(did you mean 'epochs'\?\)"):
        load_config(bad)
    bad.write_text("batch_size: eight\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: batch_size='eight' is not a valid int"):
        load_config(bad)
    bad.write_text("epochs: 2\nsteps: 5\n")
    with pytest.raises(ConfigError, match="either epochs or steps"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown key 'foo'"):
        load_config(None, sets=["foo=1"])
    with pytest.raises(ConfigError, match="is not a valid float"):
        load_config(None, sets=["lr=fast"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, sets=["lr"])
    assert load_config(None, sets=["lr=1e-3", "spd=true", "weights=none"]).lr == 1e-3
    with pytest.raises(ConfigError, match="lr: must be a finite number"):
        load_config(None, {"data": "d", "out": "o"}, sets=["lr=nan"]).validate()
    with pytest.raises(ConfigError, match="config: epochs='3' is not a valid int"):
        PretrainConfig(data="d", out="o", epochs="3").validate()
    with pytest.raises(ConfigError, match="method: 'byol'"):
        load_config(None, {"method": "byol", "data": "d", "out": "o"}).validate()
    assert main(["--quiet", "pretrain", "--data", "d", "--out", str(tmp_path / "o"), "--set", "epoch=1"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eta", "-0.5"], "eta: must be a finite number >= 0, got -0.5"),
        (["--eta", "nan"], "eta: must be a finite number >= 0, got nan"),
        (["--eta", "inf"], "eta: must be a finite number >= 0, got inf"),
        (["--spd", "--set", "hparams.blend_area=[0.0, 0.01]"], "area=[0.0, 0.01]: need 0 < min <= max < 1"),
        (["--spd", "--set", "hparams.blend_area=[0.005, 1.5]"], "area=[0.005, 1.5]: need 0 < min <= max < 1"),
        (
            ["--method", "moco", "--set", "hparams.queue_size=16"],
            "moco: queue_size=16 is larger than the data allows: need 1 <= queue_size <= 8",
        ),
    ],
)
def test_bad_spd_and_moco_values_exit_2_with_one_line(images, tmp_path, capsys, args, message):
    """12 images, batch 4: one line naming the value and the allowed range, exit 2, no run folder."""
    out = tmp_path / "run"
    code = main(
        [
            "--quiet",
            "pretrain",
            "--arch",
            "resnet18",
            "--data",
            str(images),
            "--out",
            str(out),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--image-size",
            "32",
            "--workers",
            "0",
            *args,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_folder_layouts_labels_and_bad_images(toy, tmp_path):
    labelled = _toy_method.make_images(tmp_path / "classes", n=9, classes=("good", "scratch", "dent"))
    paths, labels, names = find_images(labelled)
    assert names == ["dent", "good", "scratch"] and sorted(set(labels)) == [0, 1, 2]
    assert all(names[label] == p.parent.name for p, label in zip(paths, labels, strict=True))
    plain = _toy_method.make_images(tmp_path / "plain" / "Data" / "Images" / "Normal", n=5)
    paths, labels, names = find_images(tmp_path / "plain")
    assert len(paths) == 5 and set(labels) == {-1} and names == []
    links = tmp_path / "links"  # class folders may be links to e.g. <root>/<object>/Data/Images/Normal
    links.mkdir()
    (links / "pcb").symlink_to(plain)
    (links / "dent").symlink_to(labelled / "dent")
    paths, labels, names = find_images(links)
    assert names == ["dent", "pcb"] and labels == [0] * 3 + [1] * 5
    with pytest.raises(DataError, match="no image files found"):
        find_images(_empty_dir(tmp_path / "empty"))
    with pytest.raises(DataError, match="supervised pre-training needs class subfolders"):
        train.run_pretrain(tiny(plain, tmp_path / "sup", method="supervised"))

    (plain / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png.*--skip-bad"):
        train.run_pretrain(tiny(plain, tmp_path / "r1", steps=1, batch_size=6, workers=1))
    train.run_pretrain(tiny(plain, tmp_path / "r2", steps=1, batch_size=4, skip_bad=True))
    assert load_checkpoint(tmp_path / "r2" / "checkpoint.pt")["step"] == 1


def _empty_dir(path: Path) -> Path:
    path.mkdir()
    return path


def test_sampler_global_batch_does_not_depend_on_process_count():
    one = EpochBatchSampler(22, 8, seed=3)
    one.set_epoch(1)
    two = [EpochBatchSampler(22, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in two:
        s.set_epoch(1)
    keys = list(one)
    assert len(keys) == 16 and len({i for _, i in keys}) == 16
    ranks = [list(s) for s in two]
    for b in range(2):
        assert sorted(keys[8 * b : 8 * b + 8]) == sorted(ranks[0][4 * b : 4 * b + 4] + ranks[1][4 * b : 4 * b + 4])
    one.set_epoch(1, start_batch=1)
    assert list(one) == keys[8:]
    other = EpochBatchSampler(22, 8, seed=3)
    other.set_epoch(2)
    assert list(other) != [(2, i) for _, i in keys]


def test_sample_views_depend_only_on_seed_epoch_index(tmp_path):
    folder = _toy_method.make_images(tmp_path / "imgs", n=3)
    method = _toy_method.build_toy_method("simsiam")
    paths, labels, _ = find_images(folder)
    data = PretrainImages(paths, labels, method.view_transform(24), seed=7)
    first = data[(0, 1)]
    torch.rand(5)  # the global RNG state does not matter
    again = data[(0, 1)]
    assert torch.equal(first[0]["view1"], again[0]["view1"]) and first[1] == -1
    assert not torch.equal(first[0]["view1"], data[(1, 1)][0]["view1"])
    state = torch.get_rng_state()
    data[(0, 2)]
    assert torch.equal(state, torch.get_rng_state())  # and is left untouched
    assert Image.open(paths[0]).size == (40, 40)


def test_tensorboard_scalars_when_available(toy, images, tmp_path, monkeypatch):
    """With ``torch.utils.tensorboard`` importable, every CSV column is also a TensorBoard scalar."""
    import types

    written = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            written.append(("open", Path(log_dir).name, purge_step))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def close(self):
            written.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    train.run_pretrain(tiny(images, tmp_path / "run", steps=2, tensorboard=True))
    assert written[0] == ("open", "tensorboard", None) and written[-1] == ("close",)
    assert ("pretrain/loss", 2) in written and ("pretrain/img_per_s", 1) in written
    assert len(written) == 2 + 2 * (len(train.LOG_COLUMNS) - 2)


def test_lars_step_and_optimizer_override(toy, images, tmp_path):
    from spotdiff.pretrain.optim import LARS

    w = torch.nn.Parameter(torch.full((4,), 2.0))
    b = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = LARS(
        [{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
        lr=1.0,
        momentum=0.9,
        weight_decay=0.5,
        trust_coefficient=0.01,
    )
    for _ in range(2):
        w.grad, b.grad = torch.full((4,), 3.0), torch.full((4,), 3.0)
        before = w.detach().clone()
        opt.step()
    d1 = torch.full((4,), 4.0)  # g + wd * w at w = 2
    v1 = 0.01 * 4.0 / torch.linalg.vector_norm(d1) * d1  # trust ratio with ||w|| = 4
    d2 = 3.0 + 0.5 * before
    v2 = 0.9 * v1 + 0.01 * torch.linalg.vector_norm(before) / torch.linalg.vector_norm(d2) * d2
    assert torch.allclose(w, before - v2)
    assert torch.allclose(b, torch.full((4,), 2.0 - 3.0 - (0.9 * 3.0 + 3.0)))

    train.run_pretrain(tiny(images, tmp_path / "run", steps=2, optimizer="lars"))
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert payload["config"]["optimizer"] == "lars" and "trust_coefficient" in payload["optimizer"]["param_groups"][0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["moco", "simclr"])  # queue + momentum encoder; LARS
def test_real_method_with_spd_resumes_bit_identical(method, images, tmp_path, monkeypatch):
    """The real methods (momentum encoder, queue, SmoothBlend generator) resume exactly too."""
    hparams = {"queue_size": 8, "shuffle_groups": 2} if method == "moco" else {}  # 12 images, batch 4
    hparams |= SMALL_BLEND  # SmoothBlend holds at 32 px only with a larger area
    cfg = dict(method=method, spd=True, steps=4, checkpoint_every=2, batch_size=4, hparams=hparams)
    reference = train.run_pretrain(tiny(images, tmp_path / "ref", **cfg))

    def build_dying(name, **kwargs):
        m = methods.build_method(name, **kwargs)
        calls = []

        def forward(*args, **kw):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return type(m).forward(m, *args, **kw)

        m.forward = forward
        return m

    monkeypatch.setattr(train, "build_method", build_dying)
    with pytest.raises(KeyboardInterrupt):
        train.run_pretrain(tiny(images, tmp_path / "cut", workers=2, **cfg))
    monkeypatch.setattr(train, "build_method", methods.build_method)
    resumed = train.run_pretrain(tiny(images, tmp_path / "cut", resume=True, **cfg))
    assert_same_state(load_checkpoint(reference)["model"], load_checkpoint(resumed)["model"])
    assert [r["loss"] for r in read_log(tmp_path / "cut")] == [r["loss"] for r in read_log(tmp_path / "ref")]


def test_real_supervised_method_uses_class_folders(tmp_path):
    data = _toy_method.make_images(tmp_path / "classes", n=8, classes=("good", "scratch"))
    train.run_pretrain(
        tiny(data, tmp_path / "run", method="supervised", spd=True, steps=2, batch_size=4, hparams=SMALL_BLEND)
    )
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert payload["step"] == 2
    assert all(math.isfinite(float(r["loss"])) for r in read_log(tmp_path / "run"))
    assert payload["model"]["classifier.weight"].shape == (2, 512)  # one output per class folder
    build_backbone("resnet18", weights=tmp_path / "run" / "backbone.safetensors")


def test_pretrain_caps_batch_by_the_data_and_workers_by_the_cores(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--method",
                "simsiam",
                "--spd",
                "--arch",
                "resnet18",
                "--steps",
                "1",
                "--batch-size",
                "512",
                "--image-size",
                "32",
                "--workers",
                "4096",
                "--data",
                str(images),
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
    err = capsys.readouterr().err
    assert "batch size 512 capped at 6" in err and "workers capped at" in err
    assert "pretrain simsiam+spd" in err  # the progress bar names the run
    assert (run / "backbone.safetensors").is_file()
