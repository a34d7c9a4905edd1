"""The static checks CI runs with the tests: ruff (lint, format) and mypy (config in pyproject.toml)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["src", "tests", "benchmarks"]


def _ruff() -> list[str]:
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    return ["ruff"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command: list[str]) -> None:
    done = subprocess.run([*_ruff(), *command, *CHECKED], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"ruff {' '.join(command)} found problems:\n{done.stdout}{done.stderr}"


def test_mypy() -> None:
    """mypy over src/ (files and options from [tool.mypy] in pyproject.toml) finds nothing."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[test]')")
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"mypy found problems:\n{done.stdout}{done.stderr}"


def test_every_script_compiles() -> None:
    """Scripts no test imports (benchmarks/) still compile: a compile-time error ruff's parser lets through
    (e.g. a name used before its ``global`` declaration) fails here, not in a long benchmark run."""
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
    with pytest.raises(SyntaxError, match="prior to global declaration"):  # the check is not vacuous
        compile("X = 1\ndef f():\n    print(X)\n    global X\n", "<probe>", "exec")
