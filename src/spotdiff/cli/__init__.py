"""The ``spotdiff`` command line: parses arguments and calls the library, nothing more.

Each subcommand has one ``add_<name>`` (arguments) and one ``_run_<name>`` (calls the library)
function, in a module per command group (``data``, ``pretrain``, ``fit``, ``detect``, ``serve``,
``finetune``, ``bench``; shared options in ``options``); ``COMMANDS`` lists them in the order of
``spotdiff --help``. The stages are imported inside the ``_run_*`` functions, so ``spotdiff --help``
imports no torch. Expected errors
(:class:`spotdiff.errors.SpotdiffError`, and OS errors of the machine such as a full disk or a
read-only folder) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence

from spotdiff import __version__
from spotdiff.cli.bench import add_benchmark, add_demo
from spotdiff.cli.data import add_prepare, add_synth
from spotdiff.cli.detect import add_export, add_predict, add_test
from spotdiff.cli.finetune import add_finetune
from spotdiff.cli.fit import add_fit
from spotdiff.cli.options import apply_deprecated_workers
from spotdiff.cli.pretrain import add_export_backbone, add_pretrain
from spotdiff.cli.serve import add_serve
from spotdiff.errors import SpotdiffError
from spotdiff.progress import install_stderr_handler, set_quiet
from spotdiff.threads import apply_threads

__all__ = ["build_parser", "main"]

Runner = Callable[[argparse.Namespace], int | None]
# OS errors caused by the machine, not by spotdiff: reported in one line like a SpotdiffError.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENAMETOOLONG,
        errno.EMFILE,
        errno.ENFILE,
    }
)

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_synth,
    add_prepare,
    add_pretrain,
    add_export_backbone,
    add_fit,
    add_test,
    add_predict,
    add_export,
    add_serve,
    add_finetune,
    add_demo,
    add_benchmark,
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (used by ``main`` and by the docs)."""
    parser = argparse.ArgumentParser(
        prog="spotdiff", description="Industrial anomaly detection with SPot-the-Difference pre-training."
    )
    parser.add_argument("--version", action="version", version=f"spotdiff {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="intra-op CPU threads (default: $SPOTDIFF_THREADS, else $OMP_NUM_THREADS, else the "
        "cores idle at start: cores - 1-min load average, at least 1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():  # --quiet also after the command: `spotdiff fit ... --quiet`
        command.add_argument(
            "--quiet",
            action="store_true",
            default=argparse.SUPPRESS,
            help="no progress bars or status lines (also accepted before the command)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spotdiff`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    set_quiet(args.quiet)  # progress bars off, and the handler below drops info lines (warnings stay)
    install_stderr_handler()
    run: Runner = args.run
    try:
        apply_deprecated_workers(args)
        # a torch-free command (predict --backend onnxruntime) only needs the count, not torch
        apply_threads(args.threads, torch=getattr(args, "backend", "torch") != "onnxruntime")
        return int(run(args) or 0)
    except SpotdiffError as exc:
        print(f"spotdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"spotdiff {args.command}: error: {exc}", file=sys.stderr)  # names the file
        return 2
    except KeyboardInterrupt:
        print(f"spotdiff {args.command}: interrupted", file=sys.stderr)
        return 130
