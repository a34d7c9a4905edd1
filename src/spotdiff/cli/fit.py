"""``spotdiff fit``: fit and calibrate a 1-class detector."""

from __future__ import annotations

import argparse
from typing import Any

from spotdiff.cli.options import (
    FOLDERS,
    WEIGHTS_HELP,
    add_mask_args,
    batch_size_parent,
    check_numbers,
    device_parent,
    io_threads_parent,
    print_skipped,
    report_unmasked,
)
from spotdiff.detect import DETECTOR_NAMES


# ----------------------------------------------------------------------------- fit
def add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        parents=[
            device_parent(),
            batch_size_parent(None, "images per forward pass: default 32 (padim) / 8 (patchcore), at most 4 on CPU"),
            io_threads_parent("default: one per spare core, at most 4; 0 = none"),
        ],
        help="fit a 1-class detector (PaDiM, PatchCore) on normal images",
        description="Fit on plain folders of good images (--train) or on a dataset's training split "
        "(--data, --object), holding out a seeded share of the training images (or "
        "taking --val-good) to calibrate thresholds and the colour scale on normal "
        "images the model was not fitted on (see docs/deploy.md).",
    )
    p.add_argument("--model", choices=DETECTOR_NAMES, required=True, help="detector to fit")
    p.add_argument(
        "--train",
        default=None,
        **FOLDERS,
        help="folders of good images (instead of --data/--object); several folders, or a repeated flag, add",
    )
    p.add_argument("--data", default=None, help="raw VisA root, MVTec-AD root or prepared folder")
    p.add_argument("--object", default=None, help="object (category) name, e.g. pcb1")
    add_calibration_args(p)
    p.add_argument("--split", default="1cls", help="VisA split CSV name (default 1cls)")
    p.add_argument("--split-csv", default=None, help="explicit split CSV (default <data>/split_csv/<split>.csv)")
    p.add_argument(
        "--arch",
        default=None,
        choices=["resnet18", "resnet50", "wide_resnet50_2"],
        help="backbone (default: resnet18 for padim, wide_resnet50_2 for patchcore)",
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="W",
        help=f"backbone weights: {WEIGHTS_HELP}; default: random init, with a warning",
    )
    p.add_argument("--image-size", type=int, default=256, help="square input size in pixels (default 256)")
    p.add_argument(
        "--bn-recalibrate",
        metavar="DIR",
        default=None,
        help="re-estimate the backbone's BatchNorm statistics on the clean images of DIR first (off)",
    )
    p.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="backbone stages (default: layer1 layer2 layer3 for padim, layer2 layer3 for patchcore)",
    )
    p.add_argument(
        "--d",
        type=int,
        default=None,
        help="PaDiM: size of the random channel subset (default 100 for resnet18, 550 otherwise)",
    )
    p.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore: fraction of patches kept (default 0.1)")
    p.add_argument(
        "--coreset-shard",
        type=int,
        default=None,
        metavar="PATCHES",
        help="PatchCore: most patches per greedy coreset run, above it the coreset is approximated "
        "by shards (default 65536; 0 = exact greedy on all patches)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of random init, channel subset and coreset")
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the held-out validation share, and the train/test split seed of a dataset "
        "without an official split (magnetic tile); recorded in the model, and `spotdiff test` "
        "uses it (default 0)",
    )
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (reported) instead of failing")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing model directory --out even when it also holds other files "
        "(results, overlays, notes): they are deleted with the old model (without it, refused)",
    )
    p.add_argument(
        "--strict-weights",
        action="store_true",
        help="refuse a cached torchvision weights file whose SHA-256 does not match the hash in its "
        "name (default: use it with a warning, recorded as unverified)",
    )
    p.set_defaults(run=_run_fit)


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--val-good",
        default=None,
        **FOLDERS,
        help="normal validation images (default: a seeded --val-fraction of the training images held out)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of the training images held out without --val-good (default 0.2)",
    )
    p.add_argument(
        "--val-bad",
        default=None,
        **FOLDERS,
        help="anomalous validation images, one defect type per subfolder (for --threshold-mode f1)",
    )
    p.add_argument("--val-masks", default=None, **FOLDERS, help="masks of --val-bad images, matched by file stem")
    add_mask_args(p)
    p.add_argument(
        "--no-calibration",
        action="store_true",
        help="fit on every training image and store no thresholds (predict then needs --threshold)",
    )
    p.add_argument(
        "--threshold-mode",
        choices=["normal-fpr", "f1", "manual"],
        default="normal-fpr",
        help="normal-fpr: flag at most --target-fpr of normal validation images (default); "
        "f1: best F1 on --val-bad; manual: --threshold",
    )
    p.add_argument("--target-fpr", type=float, default=0.01, help="false-positive rate of normal-fpr (default 0.01)")
    p.add_argument("--threshold", type=float, default=None, help="image threshold of --threshold-mode manual")
    p.add_argument(
        "--pixel-threshold", type=float, default=None, help="pixel threshold (default: chosen like the image threshold)"
    )


def _run_fit(args: argparse.Namespace) -> int:
    from spotdiff.data import open_dataset
    from spotdiff.detect import PaDiM, PatchCore
    from spotdiff.detect.fitting import fit_dataset, fit_folder
    from spotdiff.devices import resolve_device
    from spotdiff.errors import ConfigError
    from spotdiff.models import load_weights, random_init_warning

    check_numbers(args)
    if args.weights is None:
        random_init_warning()
    common: dict[str, Any] = {
        "seed": args.seed,
        "device": resolve_device(args.device),
        "num_workers": args.io_threads,
        "weights": args.weights,
    }
    if args.arch:
        common["arch"] = args.arch
    if args.layers:
        common["layers"] = args.layers
    if args.batch_size:
        common["batch_size"] = args.batch_size
    model: PaDiM | PatchCore
    if args.model == "padim":
        model = PaDiM(d=args.d, **common)
    else:
        shard: dict[str, Any] = {} if args.coreset_shard is None else {"coreset_shard": args.coreset_shard or None}
        model = PatchCore(coreset_ratio=args.coreset_ratio, **shard, **common)
    model.check_params()  # bad settings and weights fail before anything is read or written
    weights = load_weights(model.arch, model.weights, strict=args.strict_weights)
    if args.bn_recalibrate is not None:
        from spotdiff.models.bn import recalibrated_weights

        weights = recalibrated_weights(weights, args.bn_recalibrate, args.image_size, args.seed)
    model.set_params(weights=weights)
    options = {
        "val_good": args.val_good,
        "val_bad": args.val_bad,
        "val_masks": args.val_masks,
        "threshold_mode": args.threshold_mode,
        "target_fpr": args.target_fpr,
        "threshold": args.threshold,
        "pixel_threshold": args.pixel_threshold,
        "val_seed": args.split_seed,
        "val_fraction": args.val_fraction,
        "mask_suffix": args.mask_suffix,
        "mask_threshold": args.mask_threshold,
        "calibrate": not args.no_calibration,
    }
    if args.train is not None:
        if args.data is not None or args.object is not None or args.skip_bad:
            raise ConfigError("--train DIR cannot be combined with --data, --object or --skip-bad")
        model.data_source_ = {"train": [str(p) for p in args.train], "split_seed": args.split_seed}
        _, cal, unmasked = fit_folder(model, args.train, image_size=args.image_size, **options)
    else:
        if args.data is None or args.object is None:
            raise ConfigError("give --train DIR (folders of good images) or --data ROOT with --object NAME")
        train = open_dataset(
            args.data,
            args.object,
            split=args.split,
            subset="train",
            image_size=args.image_size,
            split_csv=args.split_csv,
            skip_bad=args.skip_bad,
            seed=args.split_seed,
        )
        print_skipped(train.skipped)
        model.data_source_ = {
            "data": str(args.data),
            "object": args.object,
            "split": args.split,
            "split_csv": args.split_csv,
            "split_seed": args.split_seed,
        }
        _, cal, unmasked = fit_dataset(model, train, **options)
    report_unmasked(unmasked, args.val_masks)
    out = model.save(args.out, overwrite=args.overwrite)
    print(f"fitted {args.model} ({model.arch}, {model.n_train_} training images) -> {out}")
    if cal is None:
        print("no calibration (--no-calibration): no thresholds; predict needs --threshold")
    else:
        if cal.source.get("masks"):
            print(f"validation {cal.source['masks']}")
        print(cal.summary())
    return 0
