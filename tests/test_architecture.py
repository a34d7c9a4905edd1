"""Import rules of the package (docs/architecture.md): the layers, and what ``import spotdiff.data`` costs."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "spotdiff"


def test_importing_the_data_package_does_not_import_torchvision():
    """torchvision's import pulls in all its models and torch._dynamo (about 2 s); data loads it on first use."""
    code = "import sys, spotdiff.data; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _units(cell: str) -> list[str]:
    """``data/`` -> ``data``, ``files.py`` -> ``files`` for every backticked name of a table cell."""
    return [name.removesuffix("/").removesuffix(".py") for name in re.findall(r"`([^`]+)`", cell)]


def documented_rules() -> dict[str, set[str]]:
    """Unit -> the units it may import, read from the table in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| `")]
    # "shared": errors.py, the row of files.py, and the package root (spotdiff.__version__)
    shared = {"__init__", "errors", *_units(next(r for r in rows if "`files.py`" in r[0])[0])}
    rules: dict[str, set[str]] = {}
    for unit_cell, _, allowed_cell in rows:
        allowed = set(_units(allowed_cell)) | (shared if "shared" in allowed_cell else set())
        for unit in _units(unit_cell):
            rules[unit] = {"*"} if allowed_cell.strip() == "any" else allowed
    return rules


def imported_units(path: Path) -> set[str]:
    """The spotdiff units (top-level module or package) that a source file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "spotdiff" else [f"spotdiff.{a.name}" for a in node.names]
        else:  # relative imports stay inside their package
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "spotdiff":
                unit = parts[1] if len(parts) > 1 else "__init__"
                found.add(unit if (SRC / unit).is_dir() or (SRC / f"{unit}.py").is_file() else "__init__")
    return found


def test_every_import_follows_the_documented_layers():
    rules = documented_rules()
    assert {"errors", "data", "pretrain", "detect", "report", "cli"} <= set(rules)  # the table was read
    broken = []
    for path in sorted(SRC.rglob("*.py")):
        unit = path.relative_to(SRC).parts[0].removesuffix(".py")
        if unit == "__init__":  # the package root: __version__ and the error classes
            assert imported_units(path) <= {"errors"}, path
            continue
        assert unit in rules, f"{path}: unit {unit!r} has no row in docs/architecture.md"
        allowed = rules[unit]
        bad = sorted(imported_units(path) - allowed - {unit}) if "*" not in allowed else []
        broken += [f"{path.relative_to(ROOT)} imports spotdiff.{b}" for b in bad]
    assert not broken, "imports against docs/architecture.md:\n" + "\n".join(broken)


def test_the_rule_checker_catches_a_lower_layer_importing_a_higher_one(tmp_path):
    """The check is not vacuous: data importing detect, or detect importing pretrain, is caught."""
    rules = documented_rules()
    fake = tmp_path / "m.py"
    fake.write_text("import numpy\nfrom . import x\n\n"
                    "def f():\n    from spotdiff.detect import PaDiM\n    import spotdiff.pretrain.train\n")
    assert imported_units(fake) == {"detect", "pretrain"}
    assert "detect" not in rules["data"] and "pretrain" not in rules["detect"]
    assert "cli" not in rules["report"] and rules["errors"] == set()
