"""The CLI's option surface (issue 24 item 4): every option has help, --quiet before or after every
command, --model choices from the detector registry, one meaning of --workers, a light --help."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from spotdiff.cli import build_parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **sub.choices}


def test_every_option_of_every_command_has_help():
    missing = [
        f"spotdiff {name} {'/'.join(action.option_strings) or action.dest}".replace("  ", " ")
        for name, parser in _commands().items()
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()
    ]
    assert missing == []


@pytest.mark.parametrize("command", sorted(c for c in _commands() if c))
def test_quiet_is_accepted_before_and_after_every_command(command):
    parser = build_parser()
    for argv in (["--quiet", command, "--help"], [command, "--quiet", "--help"]):
        with pytest.raises(SystemExit) as stop:  # --help ends parsing after --quiet was accepted
            parser.parse_args(argv)
        assert stop.value.code == 0
    # and it is a known option of the command (an unknown one would be an argparse error, exit 2)
    assert any("--quiet" in a.option_strings for a in _commands()[command]._actions)


def test_model_choices_are_the_detector_registry():
    from spotdiff.detect import DETECTOR_NAMES, DETECTORS

    assert DETECTOR_NAMES == tuple(DETECTORS)
    [model] = [a for a in _commands()["fit"]._actions if "--model" in a.option_strings]
    assert tuple(model.choices) == DETECTOR_NAMES


def test_workers_means_worker_processes_and_io_threads_are_named_apart():
    commands = _commands()
    for name in ("pretrain", "finetune"):
        [workers] = [a for a in commands[name]._actions if "--workers" in a.option_strings]
        assert workers.dest == "workers" and "worker processes" in workers.help
    for name in ("fit", "test", "predict", "prepare"):
        options = {o: a for a in commands[name]._actions for o in a.option_strings}
        assert "--io-threads" in options
        assert options["--workers"].dest == "deprecated_workers" and "deprecated" in options["--workers"].help


def test_deprecated_workers_spelling_still_works_with_a_message(tmp_path, capsys):
    """`prepare --workers N` is read as --io-threads N, with one deprecation line; both together refused."""
    missing = tmp_path / "no-visa"
    args = ["prepare", "--visa-root", str(missing), "--split", "1cls", "--out", str(tmp_path / "out")]
    assert main([*args, "--workers", "0"]) == 2  # read as --io-threads 0: refused by prepare's own check
    err = capsys.readouterr().err
    assert "--workers is deprecated" in err and "--io-threads must be >= 1" in err
    assert main([*args, "--workers", "2", "--io-threads", "2"]) == 2
    assert "give --io-threads only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_imports_no_torch():
    """`spotdiff --help` stays fast: building the parser imports neither torch nor the detectors."""
    code = "import sys, spotdiff.cli as c; c.build_parser(); print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
