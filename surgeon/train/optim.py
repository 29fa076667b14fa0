"""Optimiser and LR schedule: SGD with momentum, a separate shift/scale group."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import ShiftScale
from .config import TrainConfig
from .parts import freeze, parse_parts


def split_params(
    model: nn.Module,
) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """``(weights, shifts, scales)``: the model's own parameters, then the inserted ones."""
    shifts, scales, seen = [], [], set()
    for m in model.modules():
        if isinstance(m, ShiftScale):
            if m.shift is not None:
                shifts.append(m.shift)
                seen.add(id(m.shift))
            if m.scale is not None:
                scales.append(m.scale)
                seen.add(id(m.scale))
    weights = [p for p in model.parameters() if id(p) not in seen]
    return weights, shifts, scales


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD over two groups: weights (lr, wd) and shift/scale (lr * ss_lr_mult, ss_wd).

    With ``cfg.train_only`` (see :mod:`surgeon.train.parts`) only the chosen parameters
    train: the others get ``requires_grad=False`` and no place in any group.

    With ``ss_decay_to="identity"`` the shift/scale weight decay pulls scales to 1 and shifts
    to 0 (applied by :func:`decay_to_identity` before each step), so the group's own
    ``weight_decay`` is 0; with ``"zero"`` it is plain SGD weight decay.
    """
    parts = parse_parts(getattr(cfg, "train_only", ""))
    if parts:  # the frozen parameters get no group and no momentum buffer
        freeze(model, parts)
    weights, shifts, scales = split_params(model)
    if parts:
        weights, shifts, scales = (
            [p for p in ps if p.requires_grad] for ps in (weights, shifts, scales)
        )
    groups = []
    if weights or not parts:
        groups.append(
            {"params": weights, "lr": cfg.lr, "weight_decay": cfg.wd, "name": "weights",
             "lr_mult": 1.0}
        )  # fmt: skip
    ss = shifts + scales
    if ss:
        wd = cfg.ss_wd if cfg.ss_decay_to == "zero" else 0.0
        groups.append(
            {
                "params": ss,
                "lr": cfg.lr * cfg.ss_lr_mult,
                "weight_decay": wd,
                "name": "shift_scale",
                "lr_mult": cfg.ss_lr_mult,
            }
        )
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
    )


@torch.no_grad()
def decay_to_identity(model: nn.Module, ss_wd: float) -> None:
    """Add ``ss_wd * (p - identity)`` to the shift/scale gradients (identity: 0 and 1)."""
    if ss_wd <= 0:
        return
    _, shifts, scales = split_params(model)
    for p in shifts:
        if p.grad is not None:
            p.grad.add_(p, alpha=ss_wd)
    for p in scales:
        if p.grad is not None:
            p.grad.add_(p - 1.0, alpha=ss_wd)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The LR multiplier at global ``step`` (0-based): warm-up, then the schedule."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        t = (step - warm) / max(total - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    step_epochs = cfg.step_size or max(cfg.epochs // 3, 1)
    return cfg.gamma ** ((step // steps_per_epoch) // step_epochs)


def set_lr(opt: torch.optim.Optimizer, cfg: TrainConfig, factor: float) -> float:
    for g in opt.param_groups:
        g["lr"] = cfg.lr * g.get("lr_mult", 1.0) * factor
    return cfg.lr * factor
