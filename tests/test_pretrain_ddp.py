"""Two CPU processes under torchrun (gloo): the loop runs a real method, and only rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import _toy_method
import pytest
import torch

from spotdiff.pretrain.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_moco_spd_run(tmp_path):
    """torchrun --nproc-per-node 2 on CPU: MoCo v2 + SPD, global batch 4 = 2 per process."""
    images = _toy_method.make_images(tmp_path / "images", n=16)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "spotdiff",
        "--quiet",
        "pretrain",
        "--method",
        "moco",
        "--spd",
        "--arch",
        "resnet18",
        "--data",
        str(images),
        "--out",
        str(run),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--checkpoint-every",
        "1",
        "--set",
        "log_every=1",
        "--set",
        "tensorboard=false",
        "--set",
        "hparams.queue_size=12",  # <= 16 images - batch 4
        "--set",
        "hparams.blend_area=[0.04, 0.08]",
        "--set",
        "hparams.blend_aspect=[0.5, 2.0]",
    ]  # SmoothBlend at 32 px
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    payload = load_checkpoint(run / "checkpoint.pt")
    assert payload["step"] == 2 and payload["world_size"] == 2
    # Both processes' keys reached the queue: 2 steps x global batch 4.
    assert int(payload["model"]["queue_ptr"]) == 8
    rows = (run / "log.csv").read_text().splitlines()
    assert len(rows) == 3  # header + one row per step, written once (rank 0 only)
    assert sorted(p.name for p in run.iterdir()) == [
        "backbone.safetensors",
        "checkpoint.pt",
        "config.yaml",
        "log.csv",
        "weights.json",
    ]
