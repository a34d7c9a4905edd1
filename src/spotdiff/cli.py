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


# ============================================================================= synth
# Owner: data.synth (issue 2). Edit only inside this section.
def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write the synthetic VisA-format default dataset",
                       description="Write the synthetic default dataset (pcb_synth, capsules_synth, cashew_synth) "
                                   "in the raw VisA layout with split CSVs and id2class.json. Deterministic per seed.")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new, empty, or a previous synth output)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="dataset size factor: 1.0 = 160 normal + 50 anomalous images per object (default 1.0)")
    p.add_argument("--image-size", type=int, default=256, metavar="PX", help="image side in pixels (default 256)")
    p.add_argument("--objects", nargs="+", metavar="NAME", default=None,
                   help="subset of objects to write (default: pcb_synth capsules_synth cashew_synth)")
    p.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from spotdiff.data.synth import generate

    out = generate(args.out, seed=args.seed, scale=args.scale, image_size=args.image_size, objects=args.objects)
    print(out)
    return 0


# ============================================================================= end of synth


# ============================================================================= prepare
# Owner: data.prepare (issue 2). Edit only inside this section.
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="copy VisA into the official MVTec-style layout",
        description="Write <out>/<split>/<object>/{train,test}/{good,bad} and ground_truth/ exactly as the "
        "official VisA prepare_data.py does. Every row is validated before anything is written; files "
        "already up to date are skipped.",
    )
    p.add_argument("--visa-root", required=True, help="raw VisA root (<root>/<object>/Data/...)")
    p.add_argument("--split", required=True, choices=["1cls", "2cls_fewshot", "2cls_highshot"])
    p.add_argument("--split-csv", help="split CSV to use (default: <visa-root>/split_csv/<split>.csv)")
    p.add_argument("--out", required=True, help="output folder; files go to <out>/<split>/")
    p.add_argument("--workers", type=int, default=None, help="threads (default: min(8, CPU count))")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from spotdiff.data.prepare import prepare_visa
    from spotdiff.errors import ConfigError

    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be >= 1")
    report = prepare_visa(args.visa_root, args.split, args.out, split_csv=args.split_csv, workers=args.workers)
    print(report.summary())
    return 0


# ============================================================================= end of prepare


# ============================================================================= pretrain
# Owner: pretrain (issue 4). Edit only inside this section.
def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pre-train a backbone (SimSiam, MoCo v2, SimCLR, supervised), optionally with SPD")
    p.set_defaults(run=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    raise SpotdiffError("pretrain: not implemented yet")


# ============================================================================= end of pretrain


# ============================================================================= export-backbone
# Owner: pretrain (issue 4). Edit only inside this section.
def _add_export_backbone(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-backbone", help="export a pre-training checkpoint's backbone as torchvision safetensors")
    p.set_defaults(run=_run_export_backbone)


def _run_export_backbone(args: argparse.Namespace) -> int:
    raise SpotdiffError("export-backbone: not implemented yet")


# ============================================================================= end of export-backbone


# ============================================================================= fit
# Owner: detect (issue 5). Edit only inside this section.
def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a 1-class detector (PaDiM, PatchCore) on normal images")
    p.set_defaults(run=_run_fit)


def _run_fit(args: argparse.Namespace) -> int:
    raise SpotdiffError("fit: not implemented yet")


# ============================================================================= end of fit


# ============================================================================= test
# Owner: detect (issue 5). Edit only inside this section.
def _add_test(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("test", help="evaluate a fitted 1-class detector on a test split")
    p.set_defaults(run=_run_test)


def _run_test(args: argparse.Namespace) -> int:
    raise SpotdiffError("test: not implemented yet")


# ============================================================================= end of test


# ============================================================================= predict
# Owner: detect (issue 5). Edit only inside this section.
def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score new images with a fitted detector; write scores CSV and heat maps")
    p.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    raise SpotdiffError("predict: not implemented yet")


# ============================================================================= end of predict


# ============================================================================= finetune
# Owner: finetune (issue 6). Edit only inside this section.
def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="2-class fine-tuning: classifier or U-Net, high-shot or k-shot")
    p.set_defaults(run=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    raise SpotdiffError("finetune: not implemented yet")


# ============================================================================= end of finetune


# ============================================================================= demo
# Owner: report/demo (issue 7). Edit only inside this section.
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the end-to-end demo on the synthetic dataset",
        description="Synthesize the default dataset, pre-train a small ResNet-18 with SimSiam and "
        "SimSiam + SPD, run PaDiM with random-init / SimSiam / SimSiam+SPD backbones on every object, "
        "print the table and write an HTML report. CPU only; a few minutes (--quick: under 2 minutes).")
    p.add_argument("--out", default="spotdiff-demo", help="working folder (default: ./spotdiff-demo)")
    p.add_argument("--quick", action="store_true", help="tiny scale, 64 px, few steps (smoke test)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, pre-training and PaDiM (default 0)")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from spotdiff.report.demo import DemoSettings, run_demo

    result = run_demo(DemoSettings.preset(quick=args.quick, seed=args.seed), args.out)
    print(result.table.to_markdown())
    print(f"report: {result.report}")
    return 0


# ============================================================================= end of demo


# ============================================================================= benchmark
# Owner: report/benchmark (issue 7). Edit only inside this section.
def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="run a benchmark grid from a YAML config, resumable",
        description="Run every (weights, downstream, object) cell of a YAML grid; cells already in "
        "<out>/cells are skipped, so an interrupted run resumes. See docs/benchmark_visa.yaml.")
    p.add_argument("--config", required=True, help="benchmark YAML file")
    p.add_argument("--out", default="spotdiff-benchmark", help="output folder (default: ./spotdiff-benchmark)")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")
    p.set_defaults(run=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    from spotdiff.report.benchmark import load_config, run_benchmark
    from spotdiff.report.tables import tables_markdown

    result = run_benchmark(load_config(args.config), args.out)
    print(tables_markdown(result.tables))
    print(f"ran {len(result.ran)} cell(s), skipped {len(result.skipped)}; report: {result.out / 'report.html'}")
    return 0


# ============================================================================= end of benchmark


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_synth,
    _add_prepare,
    _add_pretrain,
    _add_export_backbone,
    _add_fit,
    _add_test,
    _add_predict,
    _add_finetune,
    _add_demo,
    _add_benchmark,
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
