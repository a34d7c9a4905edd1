"""The learning-rate schedule of pre-training and fine-tuning: linear warm-up, then cosine to 0."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at ``step`` (0-based) of ``total_steps``.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``; then
    ``0.5 * (1 + cos(pi * t))`` with ``t = (step - warmup_steps) / (total_steps - warmup_steps)``,
    clamped to 1 (steps past the end stay at 0). SimSiam (Chen & He, 2021) and MoCo v2 (Chen et
    al., 2020) decay the lr with a cosine schedule; SimCLR (Chen et al., 2020) adds the linear warm-up.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * t))
