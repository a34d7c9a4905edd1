"""Faults while writing models: kill -9 during ``fit``, ``pretrain`` and ``benchmark``, a NaN loss.

Promises: a model directory is replaced whole or not at all; a killed pre-training run resumes
from its last checkpoint to exactly the weights of an uninterrupted run (CPU); a NaN loss stops
the run naming the step and keeps the last good checkpoint, which still exports; a killed
benchmark resumes from its finished cells to the same results as a clean run.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from reliability_helpers import (
    OBJECT,
    cli_command,
    cli_env,
    noise_jpeg,
    object_rows,
    run_cli_many,
    simple_tree,
    tree_files,
    write_tree,
)
from safetensors.torch import load_file

from spotdiff.bench.config import load_config as load_benchmark_config
from spotdiff.bench.grid import run_benchmark
from spotdiff.cli import main
from spotdiff.detect import load_detector
from spotdiff.models import build_backbone
from spotdiff.pretrain import train
from spotdiff.pretrain.checkpoint import load_checkpoint


def _fit_args(root: Path, out: Path, seed: int) -> list[str]:
    return [
        "fit",
        "--model",
        "padim",
        "--data",
        str(root),
        "--object",
        OBJECT,
        "--arch",
        "resnet18",
        "--image-size",
        "32",
        "--d",
        "16",
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]


def _temp_dirs(parent: Path, name: str) -> list[str]:
    return [e.name for e in os.scandir(parent) if e.name.startswith(f".{name}.")]


@pytest.mark.slow
def test_kill_9_while_fit_writes_leaves_the_old_model_whole(tmp_path):
    root = simple_tree(tmp_path / "visa", n_train=4, n_good=1, n_bad=1)
    models = tmp_path / "models"
    out = models / "padim"
    assert main(["--quiet", *_fit_args(root, out, seed=1)]) == 0
    old = tree_files(out)
    proc = subprocess.Popen(
        cli_command(*_fit_args(root, out, seed=2)), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 240
        while not _temp_dirs(models, "padim") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"fit ended before the kill: {proc.stderr.read()[-2000:]!r}"
    assert _temp_dirs(models, "padim"), "the kill did not land while the model was being written"
    assert tree_files(out) == old, "a killed fit changed the existing model directory"
    assert load_detector(out).seed == 1
    # The rerun replaces it whole with exactly what a clean fit writes.
    assert main(["--quiet", *_fit_args(root, out, seed=2)]) == 0
    assert main(["--quiet", *_fit_args(root, tmp_path / "clean", seed=2)]) == 0
    assert tree_files(out) == tree_files(tmp_path / "clean")


def _images(folder: Path, n: int = 8) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:03d}.JPG").write_bytes(noise_jpeg(i, size=40))
    return folder


def _pretrain_args(images: Path, out: Path, steps: int) -> list[str]:
    return [
        "pretrain",
        "--method",
        "simsiam",
        "--arch",
        "resnet18",
        "--data",
        str(images),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--checkpoint-every",
        "2",
        "--seed",
        "3",
        "--set",
        "tensorboard=false",
    ]


@pytest.mark.slow
def test_kill_9_during_pretrain_then_resume_is_bit_identical(tmp_path):
    images = _images(tmp_path / "images")
    steps = 8
    assert main(["--quiet", *_pretrain_args(images, tmp_path / "ref", steps)]) == 0
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        cli_command(*_pretrain_args(images, run, steps)),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoint.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"pretrain ended before the kill: {proc.stderr.read()[-2000:]!r}"
    killed_at = load_checkpoint(run / "checkpoint.pt")["step"]  # complete, never half-written
    assert 2 <= killed_at < steps and not (run / "backbone.safetensors").exists()
    assert main(["--quiet", *_pretrain_args(images, run, steps), "--resume"]) == 0
    ref, resumed = load_checkpoint(tmp_path / "ref" / "checkpoint.pt"), load_checkpoint(run / "checkpoint.pt")
    assert resumed["step"] == ref["step"] == steps
    assert ref["model"].keys() == resumed["model"].keys()
    for key, value in ref["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    # Same tensors (not the same bytes: safetensors writes header metadata in hash-map order).
    ref_backbone, backbone = (load_file(str(d / "backbone.safetensors")) for d in (tmp_path / "ref", run))
    assert ref_backbone.keys() == backbone.keys()
    assert all(torch.equal(ref_backbone[k], backbone[k]) for k in ref_backbone)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """The real SimSiam loop; the loss of the 3rd step is replaced by NaN."""
    real = train._forward_backward
    calls = []

    def nan_on_third(*args, **kwargs):
        stats = real(*args, **kwargs)
        calls.append(1)
        return [float("nan"), *stats[1:]] if len(calls) == 3 else stats

    monkeypatch.setattr(train, "_forward_backward", nan_on_third)
    images = _images(tmp_path / "images")
    run = tmp_path / "run"
    argv = _pretrain_args(images, run, steps=6)
    argv[argv.index("--checkpoint-every") + 1] = "1"
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert "loss became nan at step 3" in err and str(run / "checkpoint.pt") in err and "Traceback" not in err
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (run / "backbone.safetensors").exists()
    exported = tmp_path / "step2.safetensors"
    assert main(["--quiet", "export-backbone", str(run / "checkpoint.pt"), "--out", str(exported)]) == 0
    build_backbone("resnet18", weights=exported)


BENCH_OBJECTS = ("o1", "o2", "o3", "o4", "o5", "o6")


def _benchmark_config(tmp_path: Path) -> Path:
    rows = [
        r for i, obj in enumerate(BENCH_OBJECTS) for r in object_rows(obj, n_train=4, n_good=2, n_bad=2, seed=100 * i)
    ]
    write_tree(tmp_path / "visa", rows)
    config = {
        "data": {"root": "visa"},
        "objects": list(BENCH_OBJECTS),
        "image_size": 32,
        "batch_size": 8,
        "weights": [{"name": "random_r18", "arch": "resnet18"}],
        "downstream": [{"name": "padim", "method": "padim", "params": {"d": 16}}],
        "report": {"figures": False},
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cells(out: Path) -> dict[str, dict]:
    """Stored cells without their timing."""
    cells = {}
    for path in sorted((out / "cells").glob("*.json")):
        data = json.loads(path.read_text())
        data.pop("seconds")
        cells[path.name] = data
    return cells


@pytest.mark.slow
def test_kill_9_during_benchmark_then_rerun_resumes_to_the_same_results(tmp_path):
    config = _benchmark_config(tmp_path)
    assert main(["--quiet", "benchmark", "--config", str(config), "--out", str(tmp_path / "clean")]) == 0
    clean = _cells(tmp_path / "clean")
    assert len(clean) == len(BENCH_OBJECTS)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        cli_command("benchmark", "--config", config, "--out", out),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not list((out / "cells").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"benchmark ended before the kill: {proc.stderr.read()[-2000:]!r}"
    partial = _cells(out)  # every cell file there parses: none is half-written
    assert 1 <= len(partial) < len(clean)
    assert all(partial[name] == clean[name] for name in partial)
    result = run_benchmark(load_benchmark_config(config), out)
    assert sorted(result.skipped) == sorted(name.removesuffix(".json") for name in partial)
    assert _cells(out) == clean
    assert (out / "tables.md").read_text() == (tmp_path / "clean" / "tables.md").read_text()


def _limit_file_size(max_bytes: int):
    def preexec() -> None:  # SIGXFSZ ignored: a write past the limit fails with EFBIG, like ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return preexec


@pytest.mark.slow
def test_disk_full_while_fit_and_pretrain_write_is_a_clear_error(tmp_path):
    """A 1 MB file-size limit: the 45 MB backbone / checkpoint cannot be written."""
    root = simple_tree(tmp_path / "visa", n_train=4, n_good=1, n_bad=1)
    out = tmp_path / "models" / "padim"
    assert main(["--quiet", *_fit_args(root, out, seed=1)]) == 0
    old = tree_files(out)
    images = _images(tmp_path / "images")
    run = tmp_path / "run"
    codes, stderr = run_cli_many(
        [_fit_args(root, out, seed=2), _pretrain_args(images, run, steps=2)], preexec_fn=_limit_file_size(1_000_000)
    )
    assert codes == [2, 2], stderr
    assert f"{out}: cannot write" in stderr and f"{run / 'checkpoint.pt'}: cannot write" in stderr, stderr
    assert tree_files(out) == old and load_detector(out).seed == 1
    assert not _temp_dirs(out.parent, "padim"), "the failed fit left its temporary directory"
    assert not (run / "checkpoint.pt").exists() and not (run / "backbone.safetensors").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".checkpoint.pt.tmp-")]
