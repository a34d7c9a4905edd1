"""``spotdiff test``, ``spotdiff predict`` and ``spotdiff export``: use a fitted detector."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from spotdiff.cli.options import (
    FOLDERS,
    add_mask_args,
    batch_size_parent,
    check_numbers,
    device_parent,
    io_threads_parent,
    print_skipped,
    report_unmasked,
)


# ----------------------------------------------------------------------------- test
def add_test(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "test",
        parents=[
            device_parent(),
            batch_size_parent(None, "images per forward pass (default: the fitted detector's, at most 4 on CPU)"),
            io_threads_parent("default: one per spare core, at most 4; 0 = none"),
        ],
        help="evaluate a fitted 1-class detector on a test split or on plain folders",
        description="Score a labelled test set (plain folders, or a dataset's test split: "
        "MVTec-AD and VisA are read as they are) and report AU-ROC/AU-PR and what the "
        "model's own thresholds decide (false alarms, recall per defect type).",
    )
    p.add_argument("model_dir", help="model directory written by `spotdiff fit`")
    p.add_argument("--good", default=None, **FOLDERS, help="folders of good test images (instead of --data/--object)")
    p.add_argument(
        "--bad",
        default=None,
        **FOLDERS,
        help="folders of bad test images (with --good); each subfolder is a defect type",
    )
    p.add_argument(
        "--masks",
        default=None,
        **FOLDERS,
        help="masks of --bad images, matched by file stem (may mirror the --bad folders)",
    )
    add_mask_args(p)
    p.add_argument("--data", default=None, help="raw VisA root, MVTec-AD root or prepared folder")
    p.add_argument("--object", default=None, help="object (category) name")
    p.add_argument("--split", default="1cls", help="VisA split CSV name (default 1cls)")
    p.add_argument("--split-csv", default=None, help="explicit split CSV")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")
    p.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="split seed of a dataset without an official split (default: the one `fit` recorded)",
    )
    p.add_argument("--save-maps", action="store_true", help="also write maps.npz (float16 anomaly maps)")
    p.add_argument("--out", required=True, help="results directory (metrics.json, scores.csv)")
    p.set_defaults(run=_run_test)


def _run_test(args: argparse.Namespace) -> int:
    from spotdiff.detect import load_detector
    from spotdiff.detect.evaluate import evaluate_detector, open_test_set
    from spotdiff.devices import resolve_device

    check_numbers(args)
    model = load_detector(args.model_dir, device=resolve_device(args.device))
    test, found = open_test_set(
        model,
        args.model_dir,
        good=args.good,
        bad=args.bad,
        masks=args.masks,
        mask_suffix=args.mask_suffix,
        mask_threshold=args.mask_threshold,
        data=args.data,
        object=args.object,
        split=args.split,
        split_csv=args.split_csv,
        skip_bad=args.skip_bad,
        split_seed=args.split_seed,
    )
    if found is not None:
        if found.mask_note:
            print(found.mask_note, file=sys.stderr)
        report_unmasked(found.unmasked, args.masks)
    print_skipped(test.skipped)
    metrics, records, maps, _ = evaluate_detector(model, test, batch_size=args.batch_size, num_workers=args.io_threads)
    return _write_test(args, model, metrics, records, maps)


def _write_test(args: argparse.Namespace, model: Any, metrics: dict[str, Any], records: list[Any], maps: Any) -> int:
    import json

    from spotdiff.detect.evaluate import decisions_text, write_test_results
    from spotdiff.models import describe_weights

    metrics["weights"] = model.weights_record_
    written = write_test_results(args.out, metrics, records, maps if args.save_maps else None)
    headline = {k: v for k, v in metrics.items() if isinstance(v, float)}
    print(json.dumps(headline, indent=2, sort_keys=True))
    if "decisions" in metrics:
        print(decisions_text(metrics["decisions"]))
    else:
        print("no decisions: the model has no calibration (re-fit it without --no-calibration)")
    print(f"backbone weights: {describe_weights(model.weights_record_)}")
    print(f"results -> {written['metrics'].parent}")
    return 0


# ----------------------------------------------------------------------------- predict
def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="score new images with a fitted detector; write scores CSV and heat maps",
        parents=[
            device_parent(),
            batch_size_parent(None, "images per forward pass (default: the fitted detector's, at most 4 on CPU)"),
            io_threads_parent("default: one per spare core, at most 4"),
        ],
    )
    p.add_argument("model_dir", help="model directory written by `spotdiff fit`")
    p.add_argument("images", nargs="+", help="image files and/or directories (searched recursively)")
    p.add_argument(
        "--out",
        required=True,
        help="output directory, outside the model directory and the inputs (scores.csv, overlays/, "
        "masks/; scores.partial.csv until the run completes)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="flag images with score > T (default: the model's calibrated threshold); colour scale 0..2T",
    )
    p.add_argument(
        "--pixel-threshold",
        type=float,
        default=None,
        help="defect pixels have map value > T (default: the model's calibrated pixel threshold)",
    )
    p.add_argument("--masks", action="store_true", help="also write binary defect masks (masks/<stem>.png)")
    p.add_argument(
        "--backend",
        choices=["torch", "onnxruntime"],
        default="torch",
        help="torch (default) or onnxruntime (runs the file of --onnx; CPU)",
    )
    p.add_argument(
        "--onnx", default=None, metavar="FILE", help="ONNX file written by `spotdiff export` (--backend onnxruntime)"
    )
    p.add_argument("--no-overlays", action="store_true", help="write scores.csv only")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the images already scored in --out (scores.partial.csv of an interrupted run) and score the rest",
    )
    p.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    """Exit status 0: every image scored; 1: the run completed but some images are error rows
    (unreadable, or a non-finite score); 2: nothing scored, or the run stopped (bad input, a failed write)."""
    from spotdiff.detect.predict import load_predictor, predict_images
    from spotdiff.errors import DataError

    check_numbers(args)
    model = load_predictor(args.model_dir, args.backend, args.onnx, args.device)
    records = predict_images(
        model,
        args.images,
        args.out,
        threshold=args.threshold,
        batch_size=args.batch_size,
        overlays=not args.no_overlays,
        masks=args.masks,
        pixel_threshold=args.pixel_threshold,
        num_workers=args.io_threads,
        resume=args.resume,
    )
    failed = [r for r in records if r["error"]]
    for r in failed:
        print(f"error row: {r['error']}", file=sys.stderr)
    print(
        f"scored {len(records) - len(failed)} image(s), {len(failed)} failed -> {args.out}/scores.csv"
        + (" (error rows: exit status 1)" if failed else "")
    )
    if len(failed) == len(records):
        raise DataError(f"no image could be scored ({len(failed)} failed; see {args.out}/scores.csv)")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- export
def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a fitted detector (PaDiM, PatchCore) as one ONNX graph",
        description="Write the whole detector (normalisation, backbone, features, distance, map "
        "smoothing, image score; dynamic batch) as ONNX for `predict --backend onnxruntime`. "
        "Above 2 GB the tensors go to <out>.data (ONNX external data).",
    )
    p.add_argument("model_dir", help="model directory written by `spotdiff fit`")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="output file")
    p.add_argument("--external-data", action="store_true", help="write the tensors to <out>.data even below 2 GB")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from spotdiff.detect.export import export_onnx
    from spotdiff.detect.predict_output import check_output_location

    check_output_location(args.out, option="--out")
    print(export_onnx(args.model_dir, args.out, external_data=True if args.external_data else None))
    return 0
