"""benchmarks/spd_effect.py at the tiny budget: every arm and the statistics run, rows carry their
provenance, one cell re-run reproduces its metrics exactly, finished cells resume, and the
pre-registration guard refuses a missing or changed file (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MAGNETIC_TILE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import spd_effect

TIMINGS = ("cpu_s", "wall_s", "pretrain_cpu_s")

pytestmark = pytest.mark.skipif(
    not (MAGNETIC_TILE / "MT_Free").is_dir(), reason=f"magnetic-tile images not found at {MAGNETIC_TILE}"
)


def _prereg_committed() -> bool:
    return bool(spd_effect._git("log", "-1", "--format=%H", "--", "benchmarks/spd_prereg.md"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    if not _prereg_committed():
        pytest.skip("not a git checkout with the committed pre-registration")
    from spotdiff.progress import is_quiet, set_quiet

    work = tmp_path_factory.mktemp("spd_tiny")
    threads, quiet = torch.get_num_threads(), is_quiet()
    try:
        assert spd_effect.main(["--tiny", "--work", str(work), "--threads", "1"]) == 0
    finally:  # the script sets both for itself; the tests after this module must not inherit them
        torch.set_num_threads(threads)
        set_quiet(quiet)
    return work


def _metrics(row: dict) -> dict:
    return {k: v for k, v in row["metrics"].items() if k not in TIMINGS}


def test_tiny_runs_every_arm_and_the_statistics_with_provenance(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "results.jsonl").read_text().splitlines()]
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted((a, s) for a in spd_effect.ARMS for s in (0, 1))
    prereg = spd_effect.prereg_commit(spd_effect.PREREG)
    for r in rows:
        assert r["prereg_commit"] == prereg and r["commit"] and "--tiny" in r["command"]
        assert {"padim_bn", "padim_raw", "patchcore_bn", "patchcore_raw", "seg10_bn", "manip"} <= set(r["metrics"])
    # eta = 0 is the complete SPD path without its gradient: after one step its weights are plain
    # SimSiam's, so (same BN re-estimation) every BN-re-estimated endpoint agrees exactly
    by = {(r["arm"], r["seed"]): r["metrics"] for r in rows}
    assert by[("spd_eta0", 0)]["padim_bn"] == by[("simsiam", 0)]["padim_bn"]
    text = (tiny_run / "analysis.md").read_text()
    assert "Status: **complete**" in text and "**Primary endpoint** (PaDiM pixel AU-PR" in text
    assert "exact Wilcoxon p" in text and "Manipulation check" in text
    partial = spd_effect.analyse(rows[:6], spd_effect.DESIGNS["tiny"])
    assert "partial: 1 of 2 seeds" in partial


def test_one_cell_reproduces_its_metrics_exactly_and_finished_cells_resume(tiny_run, tmp_path):
    rows = [json.loads(line) for line in (tiny_run / "results.jsonl").read_text().splitlines()]
    threads = torch.get_num_threads()
    try:
        assert spd_effect.main(["--tiny", "--work", str(tmp_path), "--threads", "1", "--cell", "spd_eta0.1:1"]) == 0
        again = json.loads((tmp_path / "cell_spd_eta0.1_s1.json").read_text())
        original = next(r for r in rows if r["arm"] == "spd_eta0.1" and r["seed"] == 1)
        assert _metrics(again) == _metrics(original)
        # resume: every cell is finished, nothing runs again; --analyse only rewrites the analysis
        assert spd_effect.main(["--tiny", "--work", str(tiny_run), "--threads", "1"]) == 0
        (tiny_run / "analysis.md").unlink()
        assert spd_effect.main(["--tiny", "--work", str(tiny_run), "--analyse"]) == 0
        assert "| spd_eta0 | 1 |" in (tiny_run / "analysis.md").read_text()  # every finished cell listed
    finally:
        torch.set_num_threads(threads)
    assert len((tiny_run / "results.jsonl").read_text().splitlines()) == len(rows)


def test_missing_or_changed_preregistration_is_refused(tmp_path, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    prereg = repo / "spd_prereg.md"
    work = tmp_path / "work"
    assert spd_effect.main(["--tiny", "--work", str(work), "--prereg", str(prereg)]) == 2
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    prereg.write_text("# fixed in advance\n")
    subprocess.run([*git, "add", "spd_prereg.md"], check=True)
    subprocess.run([*git, "commit", "-qm", "prereg"], check=True)
    assert spd_effect.prereg_commit(prereg)
    prereg.write_text("# fixed in advance, then changed\n")
    assert spd_effect.main(["--tiny", "--work", str(work), "--prereg", str(prereg)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "missing" in lines[0] and "changed since its commit" in lines[1]
    assert all(str(prereg) in line for line in lines)
    assert not work.exists()
