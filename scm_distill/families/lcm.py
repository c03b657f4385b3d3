"""The 2-step sCM sampler as diffusers' stock `LCMScheduler` on a VP teacher's integer timesteps.

arXiv 2410.11081v2 Sec. 5.2: x0 = f(x, t_max), x = cos t_mid x0 + sin t_mid z', x0 = f(x, t_mid). In a VP teacher's
native space (x' = alpha x0 + sigma eps, alpha^2 = alphas_cumprod[tau]) at the integer timesteps tau_max, tau_mid
whose TrigFlow times are t_max, t_mid (METHOD.md §2), this is exactly LCMScheduler's update
    x0_hat = c_out * x0_pred(x', tau) + c_skip * x',   x' <- sqrt(ab[tau_mid]) x0_hat + sqrt(1 - ab[tau_mid]) eps
when c_skip = 0 and c_out = 1: re-noising (cos t x0 + sin t sigma_d n) read in the native space is alpha x0 + sigma n
with the same unit noise n, and the consistency function f of a network read in its own prediction type is its
x0 estimate (Eq. 5, 23). With timestep_scaling = 2^40 the boundary condition of LCMScheduler gives c_out = 1
exactly and c_skip < 1e-24 in float32 (it cannot underflow to 0 without c_out overflowing), so the update is the x0
estimate to float32 rounding. The one remaining difference from the TrigFlow sampler is the starting noise: the
pipeline draws x' ~ N(0, I) at tau_max, i.e. x_t = x' / c(t_max), instead of z ~ N(0, sigma_d^2 I); their scales
differ by the factor sqrt(1 + cos^2 t_max (1 / sigma_d^2 - 1)), exactly 1 for sigma_d = 1 and within 2e-3 of it for
SD's schedule and sigma_d >= 0.5. The toolkit's sampler for these families is this module's, so the export
reproduces it bit for bit.
"""

from __future__ import annotations

import torch
from diffusers import LCMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..parameterization import Condition, NativeModel
from ..processes import VPProcess
from ..trigflow import consistency_times
from .vp import vp_schedule_config

TIMESTEP_SCALING = 2.0**40  # LCMScheduler's boundary condition: c_out = 1, c_skip ~ 0 (see the module docstring)


def snap_timesteps(process: VPProcess, times: list[float]) -> list[int]:
    """TrigFlow times -> the nearest integer teacher timesteps (strictly decreasing, as LCMScheduler needs)."""
    tau = process.network_time(torch.tensor(times, dtype=torch.float64, device=process.log_sigma_edm.device))
    snapped = tau.round().clamp(0, process.num_train_timesteps - 1).long().tolist()
    if any(b >= a for a, b in zip(snapped, snapped[1:], strict=False)):
        raise ValueError(f"the sampling times {[round(t, 4) for t in times]} do not fall on distinct integer teacher "
                         f"timesteps ({snapped}); use fewer steps.")  # fmt: skip
    return snapped


def consistency_timesteps(process: VPProcess, num_steps: int, t_max: float, t_mid: float) -> list[int]:
    """Integer timesteps of the `num_steps`-step consistency sampler (Sec. 5.2 times, snapped)."""
    return snap_timesteps(process, consistency_times(num_steps, t_max, t_mid))


def lcm_scheduler(schedule_config: dict, prediction: str) -> LCMScheduler:
    """A stock LCMScheduler on the teacher's training schedule that applies the student's x0 estimate as is."""
    keys = vp_schedule_config(schedule_config)
    # original_inference_steps = T puts every integer timestep on LCM's "training grid" (no warnings); steps_offset 1
    # is what SD pipelines insist on (it does not move custom timesteps)
    return LCMScheduler(**keys, prediction_type=prediction, timestep_scaling=TIMESTEP_SCALING,
                        original_inference_steps=keys.get("num_train_timesteps", 1000), steps_offset=1,
                        clip_sample=False, thresholding=False)  # fmt: skip


@torch.no_grad()
def lcm_consistency_samples(model: NativeModel, shape: tuple[int, ...], timesteps: list[int],
                            scheduler: LCMScheduler, generator, condition: Condition | None = None,
                            device=None, dtype: torch.dtype = torch.float32) -> Tensor:  # fmt: skip
    """x0 samples [B, ...] in the model's space, computed as diffusers' SD/SDXL pipelines do with `scheduler`:
    starting noise, then per timestep one network call and one LCMScheduler step (which draws the re-noising
    noise), all from `generator` in the pipelines' order."""
    x = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
    scheduler.set_timesteps(timesteps=timesteps, device=device)
    for tau in scheduler.timesteps:
        out = model.network_call(model.network, x, tau, condition or {})
        x = scheduler.step(out, tau, x, generator=generator, return_dict=False)[0]
    return x


def lcm_export_samples(model: NativeModel, schedule_config: dict, shape: tuple[int, ...], num_steps: int,
                       t_max: float, t_mid: float, generator, condition: Condition | None = None,
                       device=None) -> Tensor:  # fmt: skip
    """The sampler of an LCMScheduler export (SD, SDXL, DiT): the sCM times snapped to integer timesteps, then
    `lcm_consistency_samples` with a stock LCMScheduler on the teacher's schedule."""
    timesteps = consistency_timesteps(model.process, num_steps, t_max, t_mid)
    scheduler = lcm_scheduler(schedule_config, model.prediction)
    return lcm_consistency_samples(model, shape, timesteps, scheduler, generator, condition, device)
