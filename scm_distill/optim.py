"""Optimizer and learning-rate schedule from the config (paper: RAdam/Adam, betas (0.9, 0.99))."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import OptimConfig
from .errors import UserError

OPTIMIZERS = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of the config; torch's own rejections of its values (or of no trainable parameters) become one
    sentence, raised before the run folder is created."""
    try:
        return OPTIMIZERS[cfg.name](params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    except ValueError as error:
        raise UserError(f"the {cfg.name} optimizer refuses the optim settings ({error}).") from None


# lr(step) = lr * min(1, step / warmup) / sqrt(max(step / ref, 1)) for inverse_sqrt (EDM2-style decay); `step`
# counts sCD steps; conversion steps use convert_lr (or lr) without schedule.
def learning_rate(step: int, cfg: OptimConfig, converting: bool = False) -> float:
    if converting:
        return cfg.convert_lr or cfg.lr
    lr = cfg.lr * (min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0)
    if cfg.decay == "inverse_sqrt":
        lr /= max(step / cfg.decay_ref_steps, 1.0) ** 0.5
    return lr
