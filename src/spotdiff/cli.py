"""The ``spotdiff`` command line: parses arguments and calls the library, nothing more.

Each subcommand has one ``_add_<name>`` (arguments) and one ``_run_<name>`` (calls the library)
function, in the order they are listed by ``spotdiff --help``. Expected errors
(:class:`spotdiff.errors.SpotdiffError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from spotdiff import __version__
from spotdiff.errors import SpotdiffError
from spotdiff.progress import set_quiet

Runner = Callable[[argparse.Namespace], int | None]


# ----------------------------------------------------------------------------- synth
def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write the synthetic VisA-format default dataset")
    p.add_argument("--out", required=True, help="output folder (raw VisA layout + split_csv/)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    raise SpotdiffError("synth: not implemented yet")


# ----------------------------------------------------------------------------- prepare
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="copy VisA into the official MVTec-style layout")
    p.add_argument("--visa-root", required=True, help="raw VisA root")
    p.add_argument("--split", required=True, choices=["1cls", "2cls_fewshot", "2cls_highshot"])
    p.add_argument("--split-csv", default=None, help="split CSV (default <visa-root>/split_csv/<split>.csv)")
    p.add_argument("--out", required=True, help="output root; writes <out>/<split>/<object>/...")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    raise SpotdiffError("prepare: not implemented yet")


# ----------------------------------------------------------------------------- (more commands)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_synth,
    _add_prepare,
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (used by ``main`` and by the docs)."""
    parser = argparse.ArgumentParser(
        prog="spotdiff",
        description="Industrial anomaly detection with SPot-the-Difference pre-training.",
    )
    parser.add_argument("--version", action="version", version=f"spotdiff {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spotdiff`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    set_quiet(args.quiet)
    run: Runner = args.run
    try:
        return int(run(args) or 0)
    except SpotdiffError as exc:
        print(f"spotdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spotdiff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
