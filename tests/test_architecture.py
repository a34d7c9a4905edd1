"""Import rules of the package (docs/architecture.md): the layers, and what ``import spotdiff.data`` costs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_data_package_does_not_import_torchvision():
    """torchvision's import pulls in all its models and torch._dynamo (about 2 s); data loads it on first use."""
    code = "import sys, spotdiff.data; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
