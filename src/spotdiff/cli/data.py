"""``spotdiff synth`` and ``spotdiff prepare``: the datasets."""

from __future__ import annotations

import argparse

from spotdiff.cli.options import io_threads_parent


# ----------------------------------------------------------------------------- synth
def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write the synthetic VisA-format default dataset",
        description="Write the synthetic default dataset (pcb_synth, capsules_synth, cashew_synth) "
        "in the raw VisA layout with split CSVs and id2class.json. Deterministic per seed.",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output directory (new, empty, or a previous synth output)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="dataset size factor: 1.0 = 160 normal + 50 anomalous images per object (default 1.0)",
    )
    p.add_argument("--image-size", type=int, default=256, metavar="PX", help="image side in pixels (default 256)")
    p.add_argument(
        "--objects",
        nargs="+",
        metavar="NAME",
        default=None,
        help="subset of objects to write (default: pcb_synth capsules_synth cashew_synth)",
    )
    p.add_argument(
        "--normal",
        type=int,
        default=None,
        metavar="N",
        help="normal images per object, overriding --scale's count (e.g. 1000: 900 train in 1cls)",
    )
    p.add_argument(
        "--frame",
        default=None,
        metavar="WxH",
        help="write images at WxH px (rendered at --image-size, upscaled, full-resolution noise); "
        "'visa' = 1500x1000, VisA's size, for benchmarks",
    )
    p.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from spotdiff.data.synth import VISA_FRAME, generate
    from spotdiff.errors import ConfigError

    frame = None
    if args.frame is not None:
        try:
            if args.frame == "visa":
                frame = VISA_FRAME
            else:
                width, height = (int(v) for v in args.frame.lower().split("x"))  # ValueError unless 2
                frame = (width, height)
        except ValueError:
            raise ConfigError(f"--frame must be WxH (e.g. 1500x1000) or 'visa', got {args.frame!r}") from None
    out = generate(
        args.out,
        seed=args.seed,
        scale=args.scale,
        image_size=args.image_size,
        objects=args.objects,
        normal=args.normal,
        frame=frame,
    )
    print(out)
    return 0


# ----------------------------------------------------------------------------- prepare
def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        parents=[io_threads_parent("default: min(8, CPU count)")],
        help="copy VisA into the official MVTec-style layout",
        description="Write <out>/<split>/<object>/{train,test}/{good,bad} and ground_truth/ exactly as the "
        "official VisA prepare_data.py does. Every row is validated before anything is written; files "
        "already up to date are skipped.",
    )
    p.add_argument("--visa-root", required=True, help="raw VisA root (<root>/<object>/Data/...)")
    p.add_argument(
        "--split",
        required=True,
        choices=["1cls", "2cls_fewshot", "2cls_highshot"],
        help="official VisA split to lay out",
    )
    p.add_argument("--split-csv", help="split CSV to use (default: <visa-root>/split_csv/<split>.csv)")
    p.add_argument("--out", required=True, help="output folder; files go to <out>/<split>/")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from spotdiff.data.prepare import prepare_visa
    from spotdiff.errors import ConfigError

    if args.io_threads is not None and args.io_threads < 1:
        raise ConfigError("--io-threads must be >= 1")
    report = prepare_visa(args.visa_root, args.split, args.out, split_csv=args.split_csv, workers=args.io_threads)
    print(report.summary())
    return 0
