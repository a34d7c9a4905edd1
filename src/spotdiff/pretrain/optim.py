"""Optimisers of pre-training (SGD with momentum, LARS) and the lr schedule (warm-up, cosine).

Parameter groups come from ``PretrainMethod.param_groups(lr)``; ``fixed_lr: True`` keeps a group's
lr constant (SimSiam's predictor) and ``lars_exclude: True`` skips LARS's trust-ratio scaling.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from spotdiff.errors import ConfigError


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    For every parameter ``w`` with gradient ``g`` (groups without ``lars_exclude``)::

        d = g + weight_decay * w
        d = d * trust_coefficient * ||w|| / ||d||     (when both norms are > 0)
        v = momentum * v + d ;   w = w - lr * v
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, lars_exclude=False
        )
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
                    trust = torch.where(
                        (w_norm > 0) & (d_norm > 0),
                        group["trust_coefficient"] * w_norm / d_norm,
                        torch.ones_like(w_norm),
                    )
                    d.mul_(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(method: Any, lr: float) -> Optimizer:
    """SGD or LARS (``method.recipe.optimizer``) over ``method.param_groups(lr)``."""
    recipe = method.recipe
    groups = method.param_groups(lr)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    raise ConfigError(f"optimizer: {recipe.optimizer!r} is not one of sgd, lars")


def set_lr(optimizer: Optimizer, factor: float) -> float:
    """Set every group's lr to ``peak_lr * factor`` (``fixed_lr`` groups keep ``peak_lr``).

    ``peak_lr`` is each group's lr when the optimizer was built (see :func:`remember_peak_lr`).
    Returns the lr of the first scheduled group (for logging).
    """
    shown = None
    for g in optimizer.param_groups:
        g["lr"] = g["peak_lr"] if g.get("fixed_lr") else g["peak_lr"] * factor
        if shown is None and not g.get("fixed_lr"):
            shown = g["lr"]
    return shown if shown is not None else optimizer.param_groups[0]["lr"]


def remember_peak_lr(optimizer: Optimizer) -> None:
    """Record each group's current lr as its ``peak_lr`` (saved with the optimizer state)."""
    for g in optimizer.param_groups:
        g["peak_lr"] = g["lr"]
