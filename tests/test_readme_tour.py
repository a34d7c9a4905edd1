"""The README's tour runs as written: its first bash block, in a fresh folder, at a small scale.

The lines are read from README.md (section "A tour", first ```bash block), so the README cannot
drift from the code. The only change is the environment variable the README itself shows,
``SPOTDIFF_TOUR_SCALE``. ``spotdiff`` is this interpreter's ``python -m spotdiff`` (the same
entry point as the console script).
"""

from __future__ import annotations

import ast
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOUR_SCALE = "0.1"  # 16 normal + 5 anomalous images per object


def tour_script(readme: Path = ROOT / "README.md") -> str:
    """The first ```bash block after the "## A tour" heading."""
    text = readme.read_text(encoding="utf-8")
    section = text.split("\n## A tour\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert match, "README.md: no bash block in the tour"
    return match.group(1)


def test_tour_block_is_what_the_readme_shows():
    script = tour_script()
    assert "SPOTDIFF_TOUR_SCALE" in script and "spotdiff synth" in script
    assert "/data/VisA" not in script and "torchrun" not in script  # those lines live in the next block


@pytest.mark.slow
def test_readme_tour_runs_as_written(tmp_path):
    src = str(ROOT / "src")
    env = {
        **os.environ,
        "SPOTDIFF_TOUR_SCALE": TOUR_SCALE,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    }
    prelude = f'spotdiff() {{ "{sys.executable}" -m spotdiff "$@"; }}\n'
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", prelude + tour_script()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in (
        "models/pcb/manifest.json",
        "results/pcb/metrics.json",
        "predictions/pcb/scores.csv",
        "runs/spd/backbone.safetensors",
        "models/pcb-spd/manifest.json",
    ):
        assert (tmp_path / path).is_file(), path
    with open(tmp_path / "predictions/pcb/scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["error"] == "" and (tmp_path / r["overlay"]).is_file() for r in rows)


def python_snippet(readme: Path = ROOT / "README.md") -> str:
    """The README's ```python block that fits PaDiM and prints the test metrics."""
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(encoding="utf-8"), flags=re.S)
    matches = [b for b in blocks if "evaluate_detector" in b]
    assert len(matches) == 1, "README.md: no single python block scoring the test set"
    return matches[0]


@pytest.mark.slow
def test_readme_python_snippet_scores_the_test_set_and_prints_metrics(tmp_path):
    src = str(ROOT / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    synth = subprocess.run(
        [
            sys.executable,
            "-m",
            "spotdiff",
            "--quiet",
            "synth",
            "--out",
            "data/synth",
            "--scale",
            TOUR_SCALE,
            "--objects",
            "pcb_synth",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert synth.returncode == 0, synth.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-c", python_snippet()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = ast.literal_eval(proc.stdout.strip().splitlines()[-1])  # the dict of four rounded metrics
    assert set(printed) == {"image_auroc", "image_aupr", "pixel_aupr", "pixel_aupro"}
    assert all(0.0 <= v <= 1.0 for v in printed.values())
