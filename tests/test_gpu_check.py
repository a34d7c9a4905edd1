"""benchmarks/gpu_check.sh in its CPU smoke mode, so the GPU check cannot rot while no GPU is at hand."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("smoothblend_parity", "pretrain_throughput", "torchrun_smoke", "detector_parity", "unet_amp_step")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_smoke_mode_runs_every_check_and_writes_the_report(tmp_path):
    out = tmp_path / "check.md"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [
            str(ROOT / "benchmarks" / "gpu_check.sh"),
            "--device",
            "cpu",
            "--tiny",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    md = out.read_text()
    assert md.startswith("# spotdiff GPU check\n")
    assert re.search(r"^- date: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", md, re.M)
    assert "- GPU: none (CPU run)" in md and f"- torch {torch.__version__}, CUDA " in md
    assert "- result: 5/5 checks passed" in md
    for name in CHECKS:
        assert re.search(rf"^\| {name} \| PASS \| [\d.]+ \| .+ \|$", md, re.M), name
        assert f"\n## {name}\n" in md
    rates = re.findall(r"^\| SimSiam(?: \+ SPD)? \| resnet18 \| 4 \| 32 \| fp32 \| 1 \| 2 \| ([\d.]+) \|", md, re.M)
    assert len(rates) == 2 and all(float(r) > 0 for r in rates)
    assert "process group: gloo (log: `on 1 process(es) (cpu, gloo)`)" in md
    assert (tmp_path / "work" / "smoke_run" / "backbone.safetensors").is_file()


def test_a_failing_check_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    gpu_check = _module()

    def broken(device, sizes, work):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    broken.__name__ = "check_detector_parity"
    monkeypatch.setattr(gpu_check, "CHECKS", [broken, gpu_check.check_smoothblend_parity])
    out = tmp_path / "check.md"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--work", str(tmp_path)]) == 1
    md = out.read_text()
    assert "- result: 1/2 checks passed" in md
    assert "| detector_parity | FAIL |" in md and "RuntimeError: CUDA error: an illegal memory access" in md
    assert "| smoothblend_parity | PASS |" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_without_a_gpu_and_unknown_checks_are_refused(tmp_path, capsys, monkeypatch):
    gpu_check = _module()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert gpu_check.main(["--out", str(tmp_path / "x.md")]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--only", "nope", "--out", str(tmp_path / "x.md")]) == 2
    assert "unknown check(s) ['nope']" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()
    assert not list(tmp_path.glob("spotdiff-gpu-check-*"))  # no scratch folder is left behind


def test_the_default_scratch_folder_is_removed_afterwards(tmp_path, monkeypatch):
    gpu_check = _module()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    seen = []

    def records_its_work_folder(device, sizes, work):
        seen.append(work)
        assert work.is_dir() and work.name.startswith("spotdiff-gpu-check-")
        return gpu_check.Report("smoothblend_parity", summary="ok")

    records_its_work_folder.__name__ = "check_smoothblend_parity"
    monkeypatch.setattr(gpu_check, "CHECKS", [records_its_work_folder])
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "x.md")]) == 0
    assert len(seen) == 1 and not seen[0].exists()


def test_an_out_of_memory_method_keeps_the_other_measurement(tmp_path, monkeypatch):
    gpu_check = _module()
    real = gpu_check._throughput

    def spd_runs_out_of_memory(name, spd, *args):
        if spd:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return real(name, spd, *args)

    monkeypatch.setattr(gpu_check, "_throughput", spd_runs_out_of_memory)
    out = tmp_path / "check.md"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--only", "pretrain_throughput", "--out", str(out)]) == 1
    md = out.read_text()
    assert re.search(r"^\| pretrain_throughput \| FAIL \| [\d.]+ \| SimSiam [\d.]+ img/s .*OutOfMemoryError", md, re.M)
    assert re.search(r"^\| SimSiam \| resnet18 \| 4 \| 32 \| fp32 \| 1 \| 2 \| [\d.]+ \|", md, re.M)
    assert "| SimSiam + SPD | resnet18 | 4 | 32 | fp32 | 1 | 2 | failed |" in md
