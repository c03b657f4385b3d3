"""Drawing samples from a teacher (its own DDIM sampler) and from a student (consistency sampler).

Noise is drawn with diffusers' `randn_tensor`, in the same order as the exported pipeline, so the toolkit's
samples and the export's are the same for the same generator.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .config import SamplingConfig
from .parameterization import Condition, NativeModel
from .sampling import RandnLike, sample_consistency, sample_ddim
from .trigflow import consistency_times


def randn_from(generator: torch.Generator | list[torch.Generator] | None) -> RandnLike:
    return lambda x: randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def sampling_times(cfg: SamplingConfig, model: NativeModel) -> tuple[float, float]:
    """(t_max, t_mid): t_max = arctan(sigma_max / sigma_d) clamped into the network's trained range."""
    t_min, t_hi = model.t_range
    t_max = min(math.atan(cfg.sigma_max / model.sigma_d), t_hi)
    return t_max, min(max(cfg.t_mid, t_min), t_max)


@torch.no_grad()
def consistency_samples(model: NativeModel, shape: tuple[int, ...], num_steps: int, t_max: float, t_mid: float,
                        generator, condition: Condition | None = None, device=None) -> Tensor:  # fmt: skip
    """x0 samples of a consistency model [B, ...] with `num_steps` network evaluations."""
    randn = randn_from(generator)
    z = model.sigma_d * randn(torch.empty(shape, device=device))
    times = consistency_times(num_steps, t_max, t_mid)
    return sample_consistency(lambda x, t: model.F(x, t, condition), z, times, model.sigma_d, randn)


@torch.no_grad()
def teacher_samples(model: NativeModel, shape: tuple[int, ...], num_steps: int, generator,
                    condition: Condition | None = None, device=None,
                    t_start: float | None = None) -> Tensor:  # fmt: skip
    """x0 samples of the teacher with its own DDIM sampler on its native time grid (from t_start when given: the
    student sampler's requested first time, so that both map the same x_T = sigma_d z)."""
    randn = randn_from(generator)
    z = model.sigma_d * randn(torch.empty(shape, device=device))
    times = model.process.time_grid(num_steps, t_start)
    return sample_ddim(lambda x, t: model.F(x, t, condition), z, times, model.sigma_d)
