"""Options shared by the commands: parent parsers (each option defined once), help texts and checks."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

WEIGHTS_HELP = (
    "imagenet (torchvision's ImageNet weights of --arch, from its cache or downloaded once), "
    "a torchvision weights name (IMAGENET1K_V1, IMAGENET1K_V2), random, or a .safetensors/.pth file"
)
DEVICE_HELP = "auto (cuda if available), cpu, cuda, cuda:1, ..."
IO_THREADS_HELP = (
    "threads that read and decode images (in predict, as many more write the outputs) beside the model; "
    "not worker processes (--workers of pretrain/finetune) nor intra-op threads (--threads)"
)
FOLDERS: dict[str, Any] = {"nargs": "+", "action": "extend", "metavar": "DIR"}  # several folders; a repeated flag adds


# Shared parent parsers: each option is defined once; a fresh parser per command, so that one command's
# defaults never leak into another's (argparse shares a parent's action objects).
def device_parent(note: str = "") -> argparse.ArgumentParser:
    """``--device`` (default auto, resolved by ``spotdiff.devices.resolve_device``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", default="auto", help=DEVICE_HELP + (f" {note}" if note else ""))
    return p


def batch_size_parent(default: int | None, help: str) -> argparse.ArgumentParser:
    """``--batch-size`` (images per forward pass, or per optimizer step in training)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--batch-size", type=int, default=default, metavar="N", help=help)
    return p


def workers_parent(default: int | None, help: str) -> argparse.ArgumentParser:
    """``--workers``: data-loading worker *processes* (torch's DataLoader ``num_workers``), one meaning
    everywhere; decoding threads are ``--io-threads`` and intra-op threads the global ``--threads``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--workers", type=int, default=default, metavar="N", help=f"data-loading worker processes {help}")
    return p


def io_threads_parent(default_help: str) -> argparse.ArgumentParser:
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


def apply_deprecated_workers(args: argparse.Namespace) -> None:
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


def add_mask_args(p: argparse.ArgumentParser) -> None:
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


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse a non-finite threshold and a seed outside [0, 2**32 - 1] before anything is read."""
    from spotdiff.detect.calibration import check_threshold
    from spotdiff.detect.schema import check_seed

    for name in ("threshold", "pixel_threshold"):
        if getattr(args, name, None) is not None:
            check_threshold(getattr(args, name), "--" + name.replace("_", "-"))
    for name in ("seed", "split_seed"):
        if getattr(args, name, None) is not None:
            check_seed(getattr(args, name), "--" + name.replace("_", "-"))


def print_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    """One stderr line per image dropped by --skip-bad, naming it once (printed even with --quiet:
    the run used fewer images than asked for)."""
    for path, reason in skipped:
        print(f"skipped {reason}" if reason.startswith(path) else f"skipped {path}: {reason}", file=sys.stderr)


def report_unmasked(unmasked: list, masks: Sequence[str] | None) -> None:
    """Name the bad images that the given mask folders have no mask for."""
    if unmasked and masks is not None:
        names = ", ".join(p.name for p in unmasked[:5]) + (" ..." if len(unmasked) > 5 else "")
        print(
            f"note: {len(unmasked)} bad image(s) have no mask in {', '.join(masks)}; their pixels count as "
            f"normal: {names}",
            file=sys.stderr,
        )
