"""Several processes sharing one benchmark --out: claims, --shard, config hash, bad input, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from _fake_bench import fake_metrics, slow_runner

from spotdiff.bench.cells import DOWNSTREAM
from spotdiff.bench.claims import CLAIM_DIR, Claims, parse_shard
from spotdiff.bench.config import load_config
from spotdiff.bench.grid import grid, run_benchmark, run_cell, shard_cells, weights_files
from spotdiff.cli import main

HERE = Path(__file__).resolve().parent
CONFIG = {
    "data": {"root": "data"},
    "objects": ["o1", "o2", "o3", "o4"],
    "weights": [
        {"name": "w1", "arch": "resnet18", "file": "random"},
        {"name": "w2", "arch": "resnet18", "file": "random"},
    ],
    "downstream": [{"name": "fake-a", "method": "fake"}],
    "report": {"figures": False},
}
KEYS = [f"{w}__fake-a__{o}" for w in ("w1", "w2") for o in CONFIG["objects"]]


@pytest.fixture
def fake_log(tmp_path, monkeypatch) -> Path:
    log = tmp_path / "fake.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_SECONDS", "0")
    monkeypatch.setitem(DOWNSTREAM, "fake", slow_runner)
    return log


@pytest.fixture
def config_file(tmp_path, fake_log) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    return path


def _runs(log: Path) -> tuple[Counter, Counter]:
    """(starts, ends) per cell key from the fake runner's log."""
    lines = [ln.split() for ln in log.read_text().splitlines()] if log.exists() else []
    return Counter(k for e, k, _ in lines if e == "start"), Counter(k for e, k, _ in lines if e == "end")


def _cell_files(out: Path) -> list[str]:
    return sorted(p.stem for p in (out / "cells").glob("*.json")) if (out / "cells").is_dir() else []


def _claims(out: Path) -> list[str]:
    return sorted(p.name for p in (out / CLAIM_DIR).iterdir()) if (out / CLAIM_DIR).is_dir() else []


def test_parse_shard():
    assert parse_shard(None) is None and parse_shard("2/4") == (2, 4) and parse_shard(" 1 / 1 ") == (1, 1)
    for bad in ("0/2", "3/2", "1/0", "x", "1/2/3", "-1/2", ""):
        with pytest.raises(Exception, match="--shard"):
            parse_shard(bad)


def test_shards_partition_the_grid_and_the_last_one_writes_the_tables(config_file, fake_log, tmp_path):
    config = load_config(config_file)
    cells = grid(config, weights_files(config, tmp_path))
    parts = [shard_cells(cells, (i, 3)) for i in (1, 2, 3)]
    assert sorted(c.key for p in parts for c in p) == sorted(KEYS) and [len(p) for p in parts] == [3, 3, 2]

    out = tmp_path / "out"
    first = run_benchmark(config, out, shard=(1, 2))
    assert first.ran == KEYS[0::2] and first.missing == 4 and first.tables == []
    assert not (out / "tables.md").exists()
    second = run_benchmark(config, out, shard=(2, 2))
    assert second.ran == KEYS[1::2] and second.missing == 0 and second.tables
    starts, ends = _runs(fake_log)
    assert starts == ends == Counter(KEYS)  # every cell exactly once
    md = (out / "tables.md").read_text()
    m = fake_metrics("w2__fake-a__o3")["image_aupr"]
    assert f"{100 * m:.1f}" in md and len(json.loads((out / "results.json").read_text())["cells"]) == 8
    assert _claims(out) == []  # every claim released


def test_claims_exclusive_heartbeat_and_takeover(tmp_path):
    folder = tmp_path / "claims"
    a = Claims(folder, lease=0.3)
    a.me["host"] = "another-machine"  # judged by its heartbeat, not by its pid
    assert a.claim("k") is None and a.owns("k")
    b = Claims(folder, lease=0.3)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # a beats every 0.03 s: never stale
        assert "another-machine" in b.claim("k")
        time.sleep(0.05)
    a._stop.set()  # a hangs: no more heartbeats
    a._thread.join()
    assert b.claim("k") is not None  # first sight of the stopped mtime
    time.sleep(0.35)
    assert b.claim("k") is None and b.owns("k")  # taken over as generation 2
    assert not a.owns("k")  # a sees that it lost: its result would be discarded
    a.release("k")
    assert [p.name for p in folder.iterdir()] == ["k.2.claim"]  # a's release leaves b's claim
    c = Claims(folder, lease=0.3)
    assert "pid" in c.claim("k")  # b runs in this process: alive, held
    b.close()
    assert list(folder.iterdir()) == []


def test_claim_of_a_dead_process_on_this_machine_is_taken_over_at_once(tmp_path):
    folder = tmp_path / "claims"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ghost = Claims(folder, lease=1000)
    ghost.me["pid"], ghost.me["start"] = int(dead.stdout), None
    assert ghost.claim("k") is None
    ghost._stop.set()
    taker = Claims(folder, lease=1000)
    assert taker.claim("k") is None and taker.owns("k") and not ghost.owns("k")
    taker.close()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shard", "0/2"], "--shard 0/2: I must be in 1..N"),
        (["--shard", "3/2"], "--shard 3/2: I must be in 1..N"),
        (["--shard", "1/0"], "--shard 1/0: I must be in 1..N"),
        (["--shard", "one/two"], "expected I/N"),
        (["--shard", "1/3"], "is split into 2 shards"),
        (["--device", "tpu"], "--device 'tpu': choose auto, cpu, cuda or cuda:N"),
        (["--lease", "0"], "--lease must be > 0"),
    ],
)
def test_bad_input_is_one_line_and_loses_or_repeats_no_cell(config_file, fake_log, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    base = ["--quiet", "benchmark", "--config", str(config_file), "--out", str(out)]
    assert main([*base, "--shard", "1/2"]) == 0
    capsys.readouterr()
    before = _cell_files(out)
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spotdiff benchmark: error: ") and message in err, err
    assert _cell_files(out) == before == sorted(KEYS[0::2]) and _claims(out) == []
    assert _runs(fake_log)[0] == Counter(KEYS[0::2])


def test_other_config_or_live_duplicate_shard_is_refused(config_file, fake_log, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--quiet", "benchmark", "--out", str(out)]
    assert main([*base, "--config", str(config_file), "--shard", "1/2"]) == 0
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(dict(CONFIG, objects=["o1", "o2", "o3"])))
    capsys.readouterr()
    assert main([*base, "--config", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another configuration" in err and "['objects']" in err, err
    holder = Claims(out / CLAIM_DIR)
    assert holder.claim("_shard-2-of-2") is None  # a live process (this one) runs shard 2/2
    assert main([*base, "--config", str(config_file), "--shard", "2/2"]) == 2
    err = capsys.readouterr().err
    assert "--shard 2/2 is already being run by pid" in err and err.count("\n") == 1, err
    holder.close()
    assert _cell_files(out) == sorted(KEYS[0::2]) and _runs(fake_log)[0] == Counter(KEYS[0::2])
    # --device overrides the config's device and is not part of its hash
    assert main([*base, "--config", str(config_file), "--shard", "2/2", "--device", "cpu"]) == 0
    assert _cell_files(out) == sorted(KEYS) and _runs(fake_log)[1] == Counter(KEYS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_before_anything_is_written(config_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--quiet", "benchmark", "--config", str(config_file), "--out", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda' requested but CUDA is not available" in err and err.count("\n") == 1 and not out.exists()


def test_device_auto_is_accepted_like_every_other_command(config_file, fake_log, tmp_path):
    """One device rule (devices.py): --device auto, and the config's default, run where the other commands run."""
    assert load_config(config_file).device == "auto"
    out = tmp_path / "out"
    assert main(["--quiet", "benchmark", "--config", str(config_file), "--out", str(out), "--device", "auto"]) == 0
    assert _cell_files(out) == sorted(KEYS)


def test_collect_writes_the_tables_of_the_cells_done_so_far(config_file, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--quiet", "benchmark", "--config", str(config_file), "--out", str(out)]
    assert main([*base, "--collect"]) == 2 and "no benchmark here" in capsys.readouterr().err
    assert main([*base, "--shard", "2/2"]) == 0
    assert "4 cell(s) of the grid not done yet" in capsys.readouterr().out
    assert main([*base, "--collect"]) == 0
    out_text = capsys.readouterr().out
    assert "ran 0 cell(s), skipped 4; 4 cell(s) of the grid not done yet" in out_text
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert sorted(f"{c['weights']}__{c['downstream']}__{c['object']}" for c in cells) == sorted(KEYS[1::2])


def _driver(config: Path, out: Path, log: Path, seconds: float, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)]),
        "OMP_NUM_THREADS": "1",
        "FAKE_LOG": str(log),
        "FAKE_SECONDS": str(seconds),
    }
    return subprocess.Popen(
        [
            sys.executable,
            str(HERE / "_fake_bench.py"),
            "benchmark",
            "--config",
            str(config),
            "--out",
            str(out),
            "--lease",
            "2",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_two_processes_one_killed_mid_cell_every_cell_done_once(config_file, fake_log, tmp_path):
    """Two CPU processes share --out; one is killed -9 in its second cell; the other takes it over."""
    clean = tmp_path / "clean"
    run_benchmark(load_config(config_file), clean)
    fake_log.unlink()
    out = tmp_path / "out"
    victim = _driver(config_file, out, fake_log, 0.5)
    other = _driver(config_file, out, fake_log, 0.5)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and victim.poll() is None:
            mine = [
                ln.split()
                for ln in (fake_log.read_text() if fake_log.exists() else "").splitlines()
                if ln.endswith(f" {victim.pid}")
            ]
            if sum(e == "end" for e, _, _ in mine) >= 1 and mine[-1][0] == "start":
                break  # the victim is inside its second (or later) cell
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        out_text, err_text = other.communicate(timeout=120)
    finally:
        for proc in (victim, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert victim.returncode == -signal.SIGKILL
    assert other.returncode == 0, err_text[-3000:]
    killed = [ln.split()[1] for ln in fake_log.read_text().splitlines() if ln.endswith(f" {victim.pid}")][-1]
    starts, ends = _runs(fake_log)
    assert ends == Counter(KEYS)  # every cell finished exactly once ...
    assert starts == Counter(KEYS) + Counter([killed])  # ... the killed one was started again, once
    assert f"took over the stale claim of pid {victim.pid}" in err_text
    assert _cell_files(out) == sorted(KEYS) and _claims(out) == []
    assert (out / "tables.md").read_text() == (clean / "tables.md").read_text()
    assert "ran " in out_text and "report:" in out_text


def test_an_owner_whose_claim_was_taken_over_discards_its_result(config_file, tmp_path, monkeypatch):
    """A process presumed dead (e.g. suspended past the lease) finishes its cell: nothing is written."""
    config = load_config(config_file)
    out = tmp_path / "out"
    cell = grid(config, weights_files(config, out))[0]
    owner, taker = Claims(out / CLAIM_DIR), Claims(out / CLAIM_DIR)
    taker.me["host"] = "another-machine"
    assert owner.claim(cell.key) is None

    def runner_taken_over(cell, config, work_dir):
        for path in (out / CLAIM_DIR).glob(f"{cell.key}.*.claim"):
            path.unlink()  # what a taker does to a stale claim ...
        assert taker.claim(cell.key) is None  # ... then it holds the cell
        return slow_runner(cell, config, work_dir)

    monkeypatch.setitem(DOWNSTREAM, "fake", runner_taken_over)
    assert run_cell(cell, config, out, owner) is None
    assert _cell_files(out) == [] and taker.owns(cell.key) and not owner.owns(cell.key)
    owner.release(cell.key)  # leaves the taker's claim alone
    assert _claims(out) == [f"{cell.key}.1.claim"]
    taker.close()
    owner.close()
