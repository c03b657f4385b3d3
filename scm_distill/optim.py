"""Optimizer and learning-rate schedule from the config (paper: RAdam/Adam, betas (0.9, 0.99))."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

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


# lr(step) = base * factor(step); base = lr (or convert_lr while converting), x the global batch with scale_lr
# (diffusers' --scale_lr). `step` counts sCD steps; conversion steps use their base without schedule. factor:
# constant: min(1, (step + 1) / warmup); inverse_sqrt: that / sqrt(max(step / ref, 1)) (EDM2-style decay);
# constant_with_warmup, linear, cosine: diffusers' get_scheduler over train.max_steps sCD steps, warmup_steps.
def learning_rate(step: int, cfg: OptimConfig, converting: bool = False, total_steps: int = 1,
                  global_batch: int = 1) -> float:  # fmt: skip
    base = (cfg.convert_lr or cfg.lr) if converting else cfg.lr
    base *= global_batch if cfg.scale_lr else 1
    if converting:
        return base
    if cfg.decay in DIFFUSERS_SCHEDULES:
        return base * diffusers_factor(cfg.decay, cfg.warmup_steps, total_steps)(step)
    lr = base * (min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0)
    if cfg.decay == "inverse_sqrt":
        lr /= max(step / cfg.decay_ref_steps, 1.0) ** 0.5
    return lr


DIFFUSERS_SCHEDULES = ("constant_with_warmup", "linear", "cosine")


@functools.cache
def diffusers_factor(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of step of diffusers' `get_scheduler(name, ...)`: a pure function of the step (resume-exact;
    no scheduler state to checkpoint)."""
    from diffusers.optimization import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return get_scheduler(name, probe, num_warmup_steps=warmup_steps, num_training_steps=total_steps).lr_lambdas[0]
