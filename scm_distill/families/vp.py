"""DDPM-family (variance-preserving) scheduler configs -> the teacher's process and prediction type.

Any diffusers scheduler of the DDPM family defines its training schedule by the same config keys (betas ->
alphas_cumprod); which sampler it is only changes inference. We rebuild alphas_cumprod with a stock
`DDPMScheduler` from those keys, so linear / scaled_linear / squaredcos_cap_v2 / sigmoid / trained betas and
zero-terminal-SNR rescaling all follow diffusers' own math.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler, LCMScheduler

from ..errors import UserError
from ..parameterization import Prediction, check_prediction
from ..processes import VPProcess

VP_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler", "PNDMScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
    "LMSDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "LCMScheduler", "TCDScheduler", "SASolverScheduler",
)  # fmt: skip
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr")  # fmt: skip


def vp_schedule_config(config: dict) -> dict:
    """The keys of a scheduler config that define the training schedule (checked to be a VP scheduler)."""
    name = config.get("_class_name", "?")
    if name not in VP_SCHEDULERS:
        raise UserError(f"scheduler '{name}' is not a DDPM-family scheduler this adapter understands; "
                         f"supported: {', '.join(VP_SCHEDULERS)}.")  # fmt: skip
    return {key: config[key] for key in SCHEDULE_KEYS if config.get(key) is not None}


def vp_alphas_cumprod(config: dict) -> torch.Tensor:
    keys = vp_schedule_config(config)
    try:
        return DDPMScheduler(**keys).alphas_cumprod
    except (NotImplementedError, ValueError, TypeError) as error:
        raise UserError(f"scheduler config is not understood: {error}") from None


def vp_prediction(config: dict) -> Prediction:
    return check_prediction(config.get("prediction_type", "epsilon"), ("epsilon", "v_prediction", "sample"))


def vp_process(config: dict, sigma_d: float) -> VPProcess:
    return VPProcess(vp_alphas_cumprod(config), sigma_d)


def scheduler_config(scheduler) -> dict:
    """A loaded diffusers scheduler's config as it is saved (with its class name)."""
    return {**scheduler.config, "_class_name": type(scheduler).__name__}


# --- the consistency sampler on a VP teacher's integer timesteps: a stock LCMScheduler -----------------------------
# arXiv 2410.11081v2 Sec. 5.2 in the teacher's native space x' = alpha x0 + sigma eps: LCMScheduler's step is
# x0_hat = c_out x0_pred(x', tau) + c_skip x', then x' <- sqrt(ab[tau']) x0_hat + sqrt(1 - ab[tau']) n, i.e. the
# consistency function (the x0 estimate of a network read in its own prediction type, Eq. 5, 23) and re-noising to
# the next time with fresh unit noise. Its boundary condition c_skip = 0.25 / ((10 tau)^2 + 0.25) is below 2e-8 at
# the timesteps the samplers use (tau >= 100). `set_timesteps(n)` takes n of the K timesteps k - 1, 2k - 1, ..., Kk - 1
# (k = T // K, K = original_inference_steps), evenly spaced in index from the top: for 2 steps
# [Kk - 1, Kk - 1 - k floor(K / 2)]. The export's K is the one whose 2-step grid is nearest the requested times.


def lcm_timesteps(num_train_timesteps: int, original_steps: int, num_steps: int) -> list[int]:
    """The timesteps LCMScheduler.set_timesteps(num_steps) picks with original_inference_steps = original_steps."""
    k = num_train_timesteps // original_steps
    grid = [k * (i + 1) - 1 for i in range(original_steps)][::-1]
    return [grid[int(j)] for j in np.floor(np.linspace(0, original_steps, num_steps, endpoint=False))]


def lcm_original_steps(process: VPProcess, t_max: float, t_mid: float) -> int:
    """The K (2..T) whose 2-step grid is nearest (t_max, t_mid) in TrigFlow time (squared distance)."""
    T = process.num_train_timesteps
    Ks = range(2, T + 1)
    pairs = torch.tensor([lcm_timesteps(T, K, 2) for K in Ks], dtype=torch.float64)
    times = process.t_at(pairs.flatten()).view(-1, 2)
    distance = (times[:, 0] - t_max) ** 2 + (times[:, 1] - t_mid) ** 2
    return Ks[int(distance.argmin())]


def lcm_scheduler(schedule_config: dict, prediction: str, original_steps: int) -> LCMScheduler:
    """A stock LCMScheduler on the teacher's training schedule that reads the student in its prediction type."""
    return LCMScheduler(**vp_schedule_config(schedule_config), prediction_type=prediction, clip_sample=False,
                        original_inference_steps=original_steps)  # fmt: skip


def lcm_times(process: VPProcess, scheduler: LCMScheduler) -> tuple[dict, dict]:
    """({"1", "2"}: TrigFlow times, {"1", "2"}: integer timesteps) of a scheduler's 1- and 2-step samplers."""
    config = scheduler.config
    steps = {str(n): lcm_timesteps(config.num_train_timesteps, config.original_inference_steps, n) for n in (1, 2)}
    times = {n: process.t_at(torch.tensor(tau, dtype=torch.float64)).tolist() for n, tau in steps.items()}
    return times, steps


LCM_MORE_STEPS = ("more steps take LCMScheduler's own grid of the K distilled-grid timesteps (multistep consistency "
                  "sampling; num_inference_steps above K is LCMScheduler's error)")  # fmt: skip
