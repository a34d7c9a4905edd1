"""Library messages go through ``logging`` (issue 24 item 6): a library user can silence them or capture
them, and the CLI's handler prints each as one line on stderr (info lines dropped by ``--quiet``)."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
import warnings
from pathlib import Path

from spotdiff.models import random_init_warning
from spotdiff.progress import StderrLineHandler, install_stderr_handler, set_quiet

SRC = Path(__file__).resolve().parents[1] / "src" / "spotdiff"


def test_a_library_user_can_silence_messages(capsys, monkeypatch):
    logger = logging.getLogger("spotdiff")
    monkeypatch.setattr(logger, "level", logger.level)  # restored after the test
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        random_init_warning()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_a_library_user_can_capture_messages(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="spotdiff"):
        random_init_warning()
    [record] = [r for r in caplog.records if r.name.startswith("spotdiff")]
    assert record.name == "spotdiff.models.backbones" and record.levelno == logging.WARNING
    assert "randomly initialised" in record.getMessage()
    assert capsys.readouterr().out == ""  # never on stdout


def test_the_handler_prints_one_line_and_quiet_drops_info_only(capsys):
    logger = install_stderr_handler()
    assert sum(isinstance(h, StderrLineHandler) for h in install_stderr_handler().handlers) == 1  # idempotent
    child = logging.getLogger("spotdiff.some.module")
    child.info("a status line")
    child.warning("warning: act on this")
    assert capsys.readouterr().err == "a status line\nwarning: act on this\n"
    set_quiet(True)
    child.info("hidden")
    child.warning("warning: still shown")
    assert capsys.readouterr().err == "warning: still shown\n"
    assert logger.level == logging.INFO


def test_library_info_lines_reach_the_cli_user_unless_quiet(tmp_path):
    """Through the console entry point in a fresh process (no test-session handler): a library info
    line is printed once on stderr, and not at all with --quiet."""
    out = tmp_path / "synth"
    base = [sys.executable, "-m", "spotdiff"]
    make = [*base, "synth", "--out", str(out), "--scale", "0.02", "--image-size", "32", "--objects", "pcb_synth"]
    first = subprocess.run(make, capture_output=True, text=True, check=True)
    again = subprocess.run(make, capture_output=True, text=True, check=True)
    assert again.stderr.count("already holds this dataset") == 1, (first.stderr, again.stderr)
    quiet = subprocess.run([*make[:3], "--quiet", *make[3:]], capture_output=True, text=True, check=True)
    assert "already holds" not in quiet.stderr


def test_no_print_in_the_library():
    """Library modules log; only the CLI print."""
    offenders = [
        f"{path.relative_to(SRC).as_posix()}:{node.lineno}"
        for path in sorted(SRC.rglob("*.py"))
        if path.relative_to(SRC).parts[0] != "cli"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]
    assert offenders == [], offenders
