"""docs/reproduce.md: its config file loads through the real config parser, its commands parse, its sums add up."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from spotdiff.bench.claims import parse_shard
from spotdiff.bench.config import load_config as load_benchmark_config
from spotdiff.cli import build_parser
from spotdiff.pretrain.config import load_config
from spotdiff.pretrain.simsiam import SimSiam

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reproduce.md"
IMAGENET_TRAIN = 1_281_167


def test_imagenet_config_loads_through_the_pretrain_config_parser():
    cfg = load_config(ROOT / "docs" / "imagenet_simsiam_spd_8gpu.yaml", {"data": "/data/imagenet/train", "out": "run"})
    cfg.validate()
    assert (cfg.method, cfg.spd, cfg.eta, cfg.arch, cfg.amp, cfg.device) == (
        "simsiam",
        True,
        0.1,
        "resnet50",
        "bf16",
        "cuda",
    )
    assert (cfg.epochs, cfg.batch_size, cfg.image_size) == (100, 512, 224) and cfg.batch_size % 8 == 0
    resolved = cfg.with_recipe(SimSiam.default_recipe)
    assert (resolved.optimizer, resolved.lr, resolved.weight_decay) == ("sgd", 0.05, 1e-4)


def _commands(text: str) -> list[list[str]]:
    """Every spotdiff command of the doc's bash blocks, as argv after ``spotdiff``."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    found = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        for match in re.finditer(r"(?:^|\bdo |'|-m )spotdiff ([^'&;>]*)", line):
            args = match.group(1).replace("${SLURM_ARRAY_TASK_ID}", "1").replace("$i", "0")
            found.append(shlex.split(args))
    return found


def test_every_command_parses_with_the_real_cli():
    commands = _commands(DOC.read_text())
    assert {argv[argv[0] == "--quiet"] for argv in commands} >= {
        "pretrain",
        "export-backbone",
        "benchmark",
        "finetune",
        "fit",
        "test",
    }
    assert any("--shard" in argv for argv in commands) and any("--collect" in argv for argv in commands)
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)  # SystemExit(2) on a bad command
        if args.command == "benchmark":
            parse_shard(args.shard)
            assert load_benchmark_config(ROOT / args.config).objects
        if args.command == "pretrain" and args.config:
            assert (ROOT / args.config).is_file()


def test_the_cost_arithmetic_matches_the_stated_assumptions():
    text = DOC.read_text()
    images = 100 * (IMAGENET_TRAIN // 512) * 512
    assert f"{images / 1e6:.1f} M images" in text and f"{IMAGENET_TRAIN // 512:,} steps per epoch" in text
    moco = 200 * IMAGENET_TRAIN / (53 * 3600)  # A1
    assert f"{moco:,.0f} images/s" in text
    spd_v100 = moco * 4 / 12  # A2
    modern = 5 * spd_v100  # A3
    assert f"{spd_v100:.0f} images/s" in text and f"about {round(modern, -1):,.0f} images/s" in text
    hours = images / modern / 3600
    assert f"about {hours:.0f} hours, about {8 * hours:.0f} GPU-hours" in text
    assert f"= **{images / (0.9 * 300 * 3600):.0f} GPU-hours**" in text
