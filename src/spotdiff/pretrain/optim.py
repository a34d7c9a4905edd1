"""Optimizers and the learning-rate schedule of pre-training: SGD, LARS, warm-up + cosine.

Parameter groups come from ``PretrainMethod.param_groups(lr)``; two optional group keys are
honoured: ``fix_lr: True`` keeps the group's lr constant (SimSiam's predictor), and
``lars_exclude: True`` skips LARS's trust-ratio scaling (biases and BatchNorm parameters).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    For every parameter ``w`` with gradient ``g`` (groups without ``lars_exclude``)::

        d = g + weight_decay * w
        d = d * trust_coefficient * ||w|| / ||d||     (when both norms are > 0)
        v = momentum * v + d ;   w = w - lr * v
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad.clone()
                if not group["lars_exclude"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d.mul_(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, momentum: float,
                    weight_decay: float) -> Optimizer:
    """``sgd`` or ``lars`` over the method's parameter groups; each group remembers ``base_lr``."""
    for g in groups:
        g.setdefault("lr", lr)
        g["base_lr"] = g["lr"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warm-up, then cosine to 0.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``; then
    ``0.5 * (1 + cos(pi * t))`` with ``t = (step - warmup_steps) / (total_steps - warmup_steps)``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: Optimizer, factor: float) -> float:
    """Set every group's lr to ``base_lr * factor`` (``fix_lr`` groups keep ``base_lr``).

    Returns the lr of the first scheduled group (for logging).
    """
    shown = None
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] if g.get("fix_lr") else g["base_lr"] * factor
        if shown is None and not g.get("fix_lr"):
            shown = g["lr"]
    return shown if shown is not None else optimizer.param_groups[0]["lr"]
