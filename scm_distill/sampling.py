"""Samplers: pure functions of a TrigFlow model F(x_t, t), a starting noise and injected randomness.

arXiv 2410.11081v2 Sec. 5.2 (consistency sampling) and DDIM written in TrigFlow time for the teacher. Every
sampler has the signature `sampler(F, z, times, sigma_d, randn_like)`: z is the starting noise at times[0]
(z ~ N(0, sigma_d^2 I)), `randn_like(x)` draws fresh unit noise (the caller seeds it, per sample if it wants
image k to be the same at any batch size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .trigflow import consistency_function, expand_as, trigflow_noise

TrigFlowFn = Callable[[Tensor, Tensor], Tensor]  # F(x_t [B, ...], t [B]) -> F [B, ...]
RandnLike = Callable[[Tensor], Tensor]


def _full(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


# Multistep consistency sampling (Sec. 5.2): x0 = f(x, t_i), then re-noise x = cos t_{i+1} x0 + sin t_{i+1} z'.
def sample_consistency(
    F: TrigFlowFn, z: Tensor, times: Sequence[float], sigma_d: float, randn_like: RandnLike
) -> Tensor:
    tt = _full(times[0], z)
    x0 = consistency_function(z, F(z, tt), tt, sigma_d)
    for t in times[1:]:
        tt = _full(t, z)
        x = trigflow_noise(x0, sigma_d * randn_like(z), tt)
        x0 = consistency_function(x, F(x, tt), tt, sigma_d)
    return x0


# DDIM in TrigFlow time: x0_hat from F, implied noise z_hat = (x_t - cos t x0_hat) / sin t, x_s = cos s x0 + sin s z.
def sample_ddim(
    F: TrigFlowFn, z: Tensor, times: Sequence[float], sigma_d: float, randn_like: RandnLike | None = None
) -> Tensor:
    x = z
    for t, s in zip(times, list(times[1:]) + [0.0], strict=True):
        tt, ss = _full(t, x), _full(s, x)
        x0 = consistency_function(x, F(x, tt), tt, sigma_d)
        z_hat = (x - expand_as(torch.cos(tt), x) * x0) / expand_as(torch.sin(tt), x)
        x = expand_as(torch.cos(ss), x) * x0 + expand_as(torch.sin(ss), x) * z_hat
    return x
