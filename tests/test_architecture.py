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
    fake.write_text(
        "import numpy\nfrom . import x\n\n"
        "def f():\n    from spotdiff.detect import PaDiM\n    import spotdiff.pretrain.train\n"
    )
    assert imported_units(fake) == {"detect", "pretrain"}
    assert "detect" not in rules["data"] and "pretrain" not in rules["detect"]
    assert "cli" not in rules["report"] and rules["errors"] == set()


def imported_modules(path: Path) -> set[str]:
    """The spotdiff modules (dotted, e.g. ``spotdiff.detect.store``) a source file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("spotdiff."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("spotdiff."))
    return found


def module_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports) as a path, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle_between_modules_of_a_package():
    """No module imports another that imports it back (directly or around a circle), counting
    imports inside functions too; a package's ``__init__`` re-exporting its modules is not a cycle."""
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[name] = imported_modules(path)
    known = set(graph)  # names of classes or functions imported from a package are not modules
    graph = {m: {d for d in deps if d in known and d not in (m, m.rsplit(".", 1)[0])} for m, deps in graph.items()}
    assert module_cycle(graph) is None, f"import cycle: {' -> '.join(module_cycle(graph) or [])}"
    assert module_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check is not vacuous
