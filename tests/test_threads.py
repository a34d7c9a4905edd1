"""The thread rule (spotdiff.threads.rule_threads) with the core counts and the load injected."""

from __future__ import annotations

import pytest

from spotdiff import threads
from spotdiff.cli import main
from spotdiff.threads import ENV_VAR, choose_threads, idle_cores, rule_threads


@pytest.mark.parametrize(
    ("cores", "machine", "load", "want"),
    [
        (2, 2, 0.0, 2),  # idle 2-core machine: both cores
        (2, 2, 0.4, 2),  # a little background work rounds to none busy
        (2, 2, 0.5, 1),  # half a core busy rounds up (half up, not to even)
        (2, 2, 1.0, 1),  # one core busy: one thread
        (2, 2, 6.0, 1),  # loaded far beyond the cores: still one thread, never 0
        (1, 2, 0.0, 1),  # taskset -c 0: never more threads than the CPU set
        (1, 2, 5.0, 1),
        (8, 8, 3.0, 5),
        (4, 8, 4.0, 2),  # half the machine's cores, half its load counts against them
        (4, 8, 0.9, 4),  # 0.45 busy here rounds to 0
        (4, 16, 0.0, 4),
        (16, 16, -1.0, 16),  # a nonsensical negative load counts as idle
        (0, 2, 0.0, 1),  # an empty CPU set (not on Linux) still gets a thread
    ],
)
def test_rule_threads(cores, machine, load, want):
    assert rule_threads(cores, machine, load) == want


def test_idle_cores_reads_affinity_and_load(monkeypatch):
    monkeypatch.setattr(threads, "cpu_cores", lambda: 4)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("os.getloadavg", lambda: (4.0, 0.0, 0.0))
    assert threads.idle_cores() == 2
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.idle_cores() == 4

    def no_load():
        raise OSError("no load average here")

    monkeypatch.setattr("os.getloadavg", no_load)
    assert threads.idle_cores() == 4  # unknown load counts as idle


def test_session_threads_follow_torch(monkeypatch):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "idle_cores", lambda: 1)
    try:
        assert threads.apply_threads() == 1 and threads.session_threads() == 1
        assert threads.apply_threads(2) == 2 and threads.session_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_thread_count_precedence(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.getloadavg", lambda: (50.0, 0.0, 0.0))
    assert idle_cores() == 1 and choose_threads() == (1, "idle cores")
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert idle_cores() >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads() == (None, "OMP_NUM_THREADS")
    monkeypatch.setenv(ENV_VAR, "2")
    assert choose_threads() == (2, ENV_VAR)
    assert choose_threads(5) == (5, "--threads")
    monkeypatch.setenv(ENV_VAR, "zero")
    assert main(["--quiet", "synth", "--out", "unused"]) == 2  # a bad value is an expected error
