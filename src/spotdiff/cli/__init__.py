"""The ``spotdiff`` command line: parses arguments and calls the library, nothing more.

Each subcommand has one ``_add_<name>`` (arguments) and one ``_run_<name>`` (calls the library)
function, in the order they are listed by ``spotdiff --help``. Expected errors
(:class:`spotdiff.errors.SpotdiffError`, and OS errors of the machine such as a full disk or a
read-only folder) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from typing import Any

from spotdiff import __version__
from spotdiff.detect import DETECTOR_NAMES
from spotdiff.errors import SpotdiffError
from spotdiff.progress import install_stderr_handler, set_quiet
from spotdiff.threads import apply_threads

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
WEIGHTS_HELP = (
    "imagenet (torchvision's ImageNet weights of --arch, from its cache or downloaded once), "
    "a torchvision weights name (IMAGENET1K_V1, IMAGENET1K_V2), random, or a .safetensors/.pth file"
)
DEVICE_HELP = "auto (cuda if available), cpu, cuda, cuda:1, ..."
IO_THREADS_HELP = (
    "threads that read and decode images (in predict, as many more write the outputs) beside the model; "
    "not worker processes (--workers of pretrain/finetune) nor intra-op threads (--threads)"
)


# Shared parent parsers: each option is defined once; a fresh parser per command, so that one command's
# defaults never leak into another's (argparse shares a parent's action objects).
def _device_parent(note: str = "") -> argparse.ArgumentParser:
    """``--device`` (default auto, resolved by ``spotdiff.devices.resolve_device``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", default="auto", help=DEVICE_HELP + (f" {note}" if note else ""))
    return p


def _batch_size_parent(default: int | None, help: str) -> argparse.ArgumentParser:
    """``--batch-size`` (images per forward pass, or per optimizer step in training)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--batch-size", type=int, default=default, metavar="N", help=help)
    return p


def _workers_parent(default: int | None, help: str) -> argparse.ArgumentParser:
    """``--workers``: data-loading worker *processes* (torch's DataLoader ``num_workers``), one meaning
    everywhere; decoding threads are ``--io-threads`` and intra-op threads the global ``--threads``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--workers", type=int, default=default, metavar="N", help=f"data-loading worker processes {help}")
    return p


def _io_threads_parent(default_help: str) -> argparse.ArgumentParser:
    """``--io-threads`` (decoding threads), and ``--workers`` as its deprecated spelling for one release
    (unambiguous: these commands have no worker processes)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--io-threads", type=int, default=None, metavar="N", help=f"{IO_THREADS_HELP} ({default_help})")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        dest="deprecated_workers",
        metavar="N",
        help="deprecated spelling of --io-threads (removed in the next release; --workers means worker processes)",
    )
    return p


def _apply_deprecated_workers(args: argparse.Namespace) -> None:
    """``--workers`` of fit/test/predict/prepare: say it is deprecated and use it as ``--io-threads``."""
    value = getattr(args, "deprecated_workers", None)
    if value is None:
        return
    if args.io_threads is not None:
        from spotdiff.errors import ConfigError

        raise ConfigError("give --io-threads only (--workers is its deprecated spelling)")
    print(
        f"spotdiff {args.command}: warning: --workers is deprecated here and will be removed in the next "
        "release; use --io-threads (decoding threads; --workers means data-loading worker processes)",
        file=sys.stderr,
    )
    args.io_threads = value


# ----------------------------------------------------------------------------- synth
def _add_synth(sub: argparse._SubParsersAction) -> None:
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
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        parents=[_io_threads_parent("default: min(8, CPU count)")],
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


# ----------------------------------------------------------------------------- pretrain
def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        parents=[
            _batch_size_parent(
                None, "global batch size over all processes (capped at the number of images, with a note)"
            ),
            _workers_parent(None, "per training process (default 4, capped at the CPU cores)"),
        ],
        help="pre-train a backbone (SimSiam, MoCo v2, SimCLR, supervised), optionally with SPD",
        description="Pre-train a ResNet backbone on a folder of images. Values come from the method's "
        "recipe, then --config FILE.yaml, then these flags and --set (highest). Multi-GPU / multi-node: "
        "launch the same command with torchrun --nproc-per-node N [--nnodes M ...].",
    )
    p.add_argument("--method", help="simsiam | moco | simclr | supervised (default simsiam)")
    p.add_argument("--spd", action="store_true", default=None, help="add the SPot-the-Difference loss")
    p.add_argument("--eta", type=float, help="weight of the SPD loss (default 0.1)")
    p.add_argument("--arch", help="resnet18 | resnet50 | wide_resnet50_2 (default resnet50)")
    p.add_argument("--data", metavar="DIR", help="image folder; class subfolders give labels (supervised)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory: checkpoint.pt, log.csv, backbone.safetensors")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys (see docs/pretrain.md)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="training length in epochs (default: the recipe's)")
    length.add_argument("--steps", type=int, help="training length in optimizer steps")
    p.add_argument("--lr", type=float, help="learning rate per 256 images (scaled by batch-size/256)")
    p.add_argument("--image-size", type=int, help="training view side in pixels (default 224)")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), help="mixed precision on GPU (default bf16)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="checkpoint every N steps (0: end only)")
    p.add_argument("--resume", action="store_true", default=None, help="continue RUN_DIR/checkpoint.pt")
    p.add_argument("--weights", metavar="W", help=f"initial backbone weights: {WEIGHTS_HELP} (default random)")
    p.add_argument("--skip-bad", action="store_true", default=None, help="skip unreadable images")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. --set log_every=50 --set hparams.dim=2048 (repeatable)",
    )
    p.set_defaults(run=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from spotdiff.pretrain.config import load_config
    from spotdiff.pretrain.train import run_pretrain

    keys = (
        "method",
        "spd",
        "eta",
        "arch",
        "data",
        "out",
        "epochs",
        "steps",
        "batch_size",
        "lr",
        "image_size",
        "workers",
        "amp",
        "seed",
        "checkpoint_every",
        "resume",
        "weights",
        "skip_bad",
    )
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    cfg = load_config(args.config, overrides, sets=args.set)
    print(run_pretrain(cfg))
    return 0


# ----------------------------------------------------------------------------- export-backbone
def _add_export_backbone(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-backbone", help="export a pre-training checkpoint's backbone as torchvision safetensors")
    p.add_argument("checkpoint", metavar="CKPT", help="a pre-training checkpoint (RUN_DIR/checkpoint.pt)")
    p.add_argument("--out", required=True, metavar="W.safetensors", help="output weights file")
    p.add_argument("--arch", help="expected architecture (default: the checkpoint's)")
    p.add_argument(
        "--bn-recalibrate",
        metavar="DIR",
        default=None,
        help="re-estimate every BatchNorm layer's running statistics on the clean images of DIR",
    )
    p.add_argument(
        "--bn-image-size",
        type=int,
        default=256,
        metavar="PX",
        help="image size of the BN re-estimation (default 256; use the detector's)",
    )
    p.set_defaults(run=_run_export_backbone)


def _run_export_backbone(args: argparse.Namespace) -> int:
    from spotdiff.pretrain.export import export_backbone

    print(
        export_backbone(
            args.checkpoint,
            args.out,
            arch=args.arch,
            bn_recalibrate=args.bn_recalibrate,
            bn_image_size=args.bn_image_size,
        )
    )
    return 0


def _print_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    """One stderr line per image dropped by --skip-bad, naming it once (printed even with --quiet:
    the run used fewer images than asked for)."""
    for path, reason in skipped:
        print(f"skipped {reason}" if reason.startswith(path) else f"skipped {path}: {reason}", file=sys.stderr)


# ----------------------------------------------------------------------------- fit
FOLDERS: dict[str, Any] = {"nargs": "+", "action": "extend", "metavar": "DIR"}  # several folders; a repeated flag adds


def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        parents=[
            _device_parent(),
            _batch_size_parent(None, "images per forward pass: default 32 (padim) / 8 (patchcore), at most 4 on CPU"),
            _io_threads_parent("default: one per spare core, at most 4; 0 = none"),
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
    _add_calibration_args(p)
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


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
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
    _add_mask_args(p)
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


def _add_mask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mask-suffix",
        default=None,
        metavar="S",
        help="a mask is named <image stem>S (default: '_mask' or nothing, whichever matches; said which)",
    )
    p.add_argument(
        "--mask-threshold",
        type=float,
        default=None,
        metavar="T",
        help="count mask values > T as defect pixels (default: masks must be binary, 0 and one value)",
    )


def _run_fit(args: argparse.Namespace) -> int:
    from spotdiff.data import open_dataset
    from spotdiff.detect import PaDiM, PatchCore
    from spotdiff.detect.fitting import fit_dataset, fit_folder
    from spotdiff.devices import resolve_device
    from spotdiff.errors import ConfigError
    from spotdiff.models import load_weights, random_init_warning

    _check_numbers(args)
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
        _print_skipped(train.skipped)
        model.data_source_ = {
            "data": str(args.data),
            "object": args.object,
            "split": args.split,
            "split_csv": args.split_csv,
            "split_seed": args.split_seed,
        }
        _, cal, unmasked = fit_dataset(model, train, **options)
    _report_unmasked(unmasked, args.val_masks)
    out = model.save(args.out, overwrite=args.overwrite)
    print(f"fitted {args.model} ({model.arch}, {model.n_train_} training images) -> {out}")
    if cal is None:
        print("no calibration (--no-calibration): no thresholds; predict needs --threshold")
    else:
        if cal.source.get("masks"):
            print(f"validation {cal.source['masks']}")
        print(cal.summary())
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse a non-finite threshold and a seed outside [0, 2**32 - 1] before anything is read."""
    from spotdiff.detect.calibration import check_threshold
    from spotdiff.detect.schema import check_seed

    for name in ("threshold", "pixel_threshold"):
        if getattr(args, name, None) is not None:
            check_threshold(getattr(args, name), "--" + name.replace("_", "-"))
    for name in ("seed", "split_seed"):
        if getattr(args, name, None) is not None:
            check_seed(getattr(args, name), "--" + name.replace("_", "-"))


def _report_unmasked(unmasked: list, masks: Sequence[str] | None) -> None:
    """Name the bad images that the given mask folders have no mask for."""
    if unmasked and masks is not None:
        names = ", ".join(p.name for p in unmasked[:5]) + (" ..." if len(unmasked) > 5 else "")
        print(
            f"note: {len(unmasked)} bad image(s) have no mask in {', '.join(masks)}; their pixels count as "
            f"normal: {names}",
            file=sys.stderr,
        )


# ----------------------------------------------------------------------------- test
def _add_test(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "test",
        parents=[
            _device_parent(),
            _batch_size_parent(None, "images per forward pass (default: the fitted detector's, at most 4 on CPU)"),
            _io_threads_parent("default: one per spare core, at most 4; 0 = none"),
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
    _add_mask_args(p)
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

    _check_numbers(args)
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
        _report_unmasked(found.unmasked, args.masks)
    _print_skipped(test.skipped)
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
def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="score new images with a fitted detector; write scores CSV and heat maps",
        parents=[
            _device_parent(),
            _batch_size_parent(None, "images per forward pass (default: the fitted detector's, at most 4 on CPU)"),
            _io_threads_parent("default: one per spare core, at most 4"),
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

    _check_numbers(args)
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
def _add_export(sub: argparse._SubParsersAction) -> None:
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


# ----------------------------------------------------------------------------- serve
def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        parents=[_device_parent("(torch backend)")],
        help="serve fitted detectors over HTTP (micro-batched, audited, authenticated)",
        description="An inspection service: POST an image to /v1/models/NAME/predict, get the "
        "calibrated decision; every answer is appended to the audit log first. "
        "See docs/serve.md.",
    )
    p.add_argument(
        "model_dirs",
        nargs="+",
        metavar="MODEL_DIR",
        help="calibrated model directory (served under its folder name) or NAME=DIR",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others need an API key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--backend", choices=["torch", "onnxruntime"], default="torch", help="torch (default) or onnxruntime"
    )
    p.add_argument(
        "--onnx",
        action="append",
        default=None,
        metavar="FILE",
        help="ONNX file from `spotdiff export`; repeat it, one per MODEL_DIR in order (--backend onnxruntime)",
    )
    p.add_argument(
        "--audit-log",
        default="audit.jsonl",
        metavar="FILE",
        help="JSON-lines audit log, appended (default audit.jsonl in the working directory)",
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        metavar="FILE",
        help="accepted bearer keys, one per line (also $SPOTDIFF_API_KEYS, comma-separated)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow this browser origin (repeatable; default: CORS off)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="most images per model batch (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill (default 5)")
    p.add_argument("--max-queue", type=int, default=64, help="requests in progress per model before 503 (default 64)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MiB (default 20)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image, width x height (default 40e6)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a score before 504 (default 30)")
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from spotdiff.errors import ConfigError

    try:
        from spotdiff.serve import ServeConfig, read_api_keys, serve
    except ModuleNotFoundError as exc:
        raise ConfigError(f'spotdiff serve needs {exc.name}: pip install "spotdiff[serve]"') from exc
    config = ServeConfig(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        request_timeout_s=args.timeout,
        api_keys=read_api_keys(args.api_key_file),
        cors_origins=tuple(args.cors_origin),
    )
    serve(
        args.model_dirs,
        host=args.host,
        port=args.port,
        backend=args.backend,
        onnx_files=args.onnx,
        audit_log=args.audit_log,
        config=config,
        device=args.device,
    )
    return 0


# ----------------------------------------------------------------------------- finetune
def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        parents=[
            _device_parent(),
            _batch_size_parent(16, "images per optimizer step (default 16)"),
            _workers_parent(4, "(default 4)"),
        ],
        help="2-class fine-tuning: classifier or U-Net, high-shot or k-shot",
        description="Fine-tune a binary classifier (cls) or a U-Net (seg) on normal and anomalous "
        "images, for several seeds; write per-seed metrics, mean ± std and a table. "
        "See docs/finetune.md.",
    )
    p.add_argument("--task", required=True, choices=["cls", "seg"], help="cls: image classifier; seg: U-Net")
    p.add_argument(
        "--protocol",
        required=True,
        choices=["highshot", "10shot", "5shot"],
        help="highshot: the 2cls_highshot train subset; 10shot/5shot: k images of each class from 2cls_fewshot",
    )
    p.add_argument("--data", required=True, metavar="ROOT", help="dataset root (VisA layout with split_csv/)")
    p.add_argument("--object", default="all", metavar="NAME", help="object name, or 'all' (default)")
    p.add_argument(
        "--weights",
        default=None,
        metavar="W",
        help=f"backbone weights: {WEIGHTS_HELP}; default: random init, with a warning",
    )
    p.add_argument("--arch", default="resnet50", help="resnet18, resnet50 (default) or wide_resnet50_2")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds, run as 0..N-1 (default 5)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="training epochs (default: protocol steps)")
    length.add_argument(
        "--steps", type=int, default=None, help="optimisation steps (default 1000 high-shot, 300 k-shot)"
    )
    p.add_argument("--lr", type=float, default=1e-4, help="encoder learning rate; new layers use 10x (default 1e-4)")
    p.add_argument("--image-size", type=int, default=256, help="square input size in pixels (default 256)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(run=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spotdiff.finetune import FinetuneConfig, run_finetune
    from spotdiff.models import random_init_warning

    if args.weights is None:
        random_init_warning()
    config = FinetuneConfig(
        task=args.task,
        protocol=args.protocol,
        data=Path(args.data),
        out=Path(args.out),
        object=args.object,
        weights=args.weights,
        arch=args.arch,
        seeds=args.seeds,
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        image_size=args.image_size,
        device=args.device,
        workers=args.workers,
    )
    run_finetune(config)
    print((Path(args.out) / "table.md").read_text(encoding="utf-8"), end="")
    print(f"results written to {args.out}")
    return 0


# ----------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the end-to-end demo on the synthetic dataset",
        description="Synthesize the default dataset, pre-train a small ResNet-18 with SimSiam and "
        "SimSiam + SPD, run PaDiM with random-init / SimSiam / SimSiam+SPD backbones on every object, "
        "print the table and write an HTML report. CPU only; measured run times are in the README.",
    )
    p.add_argument("--out", default="spotdiff-demo", help="working folder (default: ./spotdiff-demo)")
    p.add_argument("--quick", action="store_true", help="tiny scale, 64 px, few steps (smoke test)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, pre-training and PaDiM (default 0)")
    p.add_argument(
        "--weights",
        default=None,
        metavar="W",
        help="also run PaDiM on this backbone, e.g. imagenet (torchvision's ImageNet resnet18 from its "
        "cache; see --help of fit)",
    )
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from spotdiff.bench.demo import DemoSettings, run_demo

    result = run_demo(DemoSettings.preset(quick=args.quick, seed=args.seed), args.out, weights=args.weights)
    print(result.table.to_markdown())
    if result.smoke_note:
        print(f"\n{result.smoke_note}")
    print(f"report: {result.report}")
    return 0


# ----------------------------------------------------------------------------- benchmark
def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="run a benchmark grid from a YAML config, resumable",
        description="Run every (weights, downstream, object) cell of a YAML grid; cells already in "
        "<out>/cells are skipped, so an interrupted run resumes. Several processes may share one --out "
        "(each cell runs once); see docs/report.md and docs/benchmark_visa.yaml.",
    )
    p.add_argument("--config", required=True, help="benchmark YAML file")
    p.add_argument("--out", default="spotdiff-benchmark", help="output folder (default: ./spotdiff-benchmark)")
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N (every N-th cell, from cell I)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N for this process (default: the config's device, auto)")
    p.add_argument(
        "--lease",
        type=float,
        metavar="S",
        help="take over a cell claimed from another machine after S s without heartbeat (default 300)",
    )
    p.add_argument("--collect", action="store_true", help="only write the tables from the cells done so far")
    p.set_defaults(run=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    from spotdiff.bench.claims import LEASE_SECONDS, parse_shard
    from spotdiff.bench.config import load_config
    from spotdiff.bench.grid import collect_benchmark, run_benchmark
    from spotdiff.report.tables import tables_markdown

    shard = parse_shard(args.shard)
    config = load_config(args.config, device=args.device)
    if args.collect:
        result = collect_benchmark(config, args.out)
    else:
        result = run_benchmark(config, args.out, shard=shard, lease=LEASE_SECONDS if args.lease is None else args.lease)
    if result.tables:
        print(tables_markdown(result.tables))
    print(
        f"ran {len(result.ran)} cell(s), skipped {len(result.skipped)}; "
        + (
            f"{result.missing} cell(s) of the grid not done yet"
            if result.missing
            else f"report: {result.out / 'report.html'}"
            if result.tables
            else "every cell done"
        )
    )
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_synth,
    _add_prepare,
    _add_pretrain,
    _add_export_backbone,
    _add_fit,
    _add_test,
    _add_predict,
    _add_export,
    _add_serve,
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
        _apply_deprecated_workers(args)
        apply_threads(args.threads)
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


if __name__ == "__main__":
    sys.exit(main())
