"""Exponential moving average of the student with a half-life in samples (the exported weights are the EMA).

Half-life convention as in EDM (Karras et al. 2022): after `halflife` samples an old weight has half its
influence; the optional ramp-up caps the half-life at `rampup_ratio` x samples seen, so short runs are not
dominated by the initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


# beta = 0.5 ** (batch / halflife), halflife = min(halflife_kimg * 1000, rampup_ratio * samples_seen).
def ema_beta(batch_size: int, samples_seen: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    halflife = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife = min(halflife, rampup_ratio * samples_seen)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


class EMA:
    """A frozen copy of a module whose floating-point parameters and buffers track the live module."""

    def __init__(self, module: nn.Module):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, beta: float) -> None:
        for ema_p, p in zip(self.module.parameters(), module.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1 - beta)
        for ema_b, b in zip(self.module.buffers(), module.buffers(), strict=True):
            ema_b.copy_(b)

    @torch.no_grad()
    def reset(self, module: nn.Module) -> None:
        """Restart the average at the live module's current weights."""
        self.update(module, beta=0.0)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
