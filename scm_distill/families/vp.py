"""DDPM-family (variance-preserving) scheduler configs -> the teacher's process and prediction type.

Any diffusers scheduler of the DDPM family defines its training schedule by the same config keys (betas ->
alphas_cumprod); which sampler it is only changes inference. We rebuild alphas_cumprod with a stock
`DDPMScheduler` from those keys, so linear / scaled_linear / squaredcos_cap_v2 / sigmoid / trained betas and
zero-terminal-SNR rescaling all follow diffusers' own math.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

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
        raise ValueError(f"scheduler '{name}' is not a DDPM-family scheduler this adapter understands; "
                         f"supported: {', '.join(VP_SCHEDULERS)}.")  # fmt: skip
    return {key: config[key] for key in SCHEDULE_KEYS if config.get(key) is not None}


def vp_alphas_cumprod(config: dict) -> torch.Tensor:
    keys = vp_schedule_config(config)
    try:
        return DDPMScheduler(**keys).alphas_cumprod
    except (NotImplementedError, ValueError, TypeError) as error:
        raise ValueError(f"scheduler config is not understood: {error}") from None


def vp_prediction(config: dict) -> Prediction:
    return check_prediction(config.get("prediction_type", "epsilon"), ("epsilon", "v_prediction", "sample"))


def vp_process(config: dict, sigma_d: float) -> VPProcess:
    return VPProcess(vp_alphas_cumprod(config), sigma_d)


def scheduler_config(scheduler) -> dict:
    """A loaded diffusers scheduler's config as it is saved (with its class name)."""
    return {**scheduler.config, "_class_name": type(scheduler).__name__}
