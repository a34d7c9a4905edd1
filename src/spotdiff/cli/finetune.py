"""``spotdiff finetune``: 2-class fine-tuning (classifier or U-Net)."""

from __future__ import annotations

import argparse

from spotdiff.cli.options import WEIGHTS_HELP, batch_size_parent, device_parent, workers_parent


# ----------------------------------------------------------------------------- finetune
def add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        parents=[
            device_parent(),
            batch_size_parent(16, "images per optimizer step (default 16)"),
            workers_parent(4, "(default 4)"),
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
