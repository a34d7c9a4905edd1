"""Two CPU processes under torchrun (gloo): the loop runs, and only rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _toy_method
from spotdiff.pretrain.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_run_completes(tmp_path):
    images = _toy_method.make_images(tmp_path / "images", n=12)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "_toy_method.py"), "--quiet", "pretrain", "--arch", "resnet18",
           "--data", str(images), "--out", str(run), "--steps", "3", "--batch-size", "4",
           "--image-size", "32", "--workers", "0", "--checkpoint-every", "2", "--set", "log_every=1",
           "--set", "tensorboard=false", "--spd"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    payload = load_checkpoint(run / "checkpoint.pt")
    assert payload["step"] == 3 and payload["world_size"] == 2
    rows = (run / "log.csv").read_text().splitlines()
    assert len(rows) == 4  # header + one row per step, written once (rank 0 only)
    assert sorted(p.name for p in run.iterdir()) == ["backbone.safetensors", "checkpoint.pt", "config.yaml", "log.csv"]
    # The processes stayed in sync: DDP averaged the gradients, so rank 0's weights moved.
    assert not torch.equal(payload["backbone"]["conv1.weight"],
                           _toy_method.build_toy_method("simsiam").backbone.conv1.weight)
