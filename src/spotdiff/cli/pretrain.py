"""``spotdiff pretrain`` and ``spotdiff export-backbone``: self-supervised pre-training of a backbone."""

from __future__ import annotations

import argparse

from spotdiff.cli.options import WEIGHTS_HELP, batch_size_parent, workers_parent


# ----------------------------------------------------------------------------- pretrain
def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        parents=[
            batch_size_parent(
                None, "global batch size over all processes (capped at the number of images, with a note)"
            ),
            workers_parent(None, "per training process (default 4, capped at the CPU cores)"),
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
def add_export_backbone(sub: argparse._SubParsersAction) -> None:
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
