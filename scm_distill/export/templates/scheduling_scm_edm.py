"""The sCM sampler of a distilled EDM-preconditioned network as a scheduler (written by scm-distill; torch + diffusers).

Method: C. Lu, Y. Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
arXiv 2410.11081v2, Sec. 5.2, in EDM coordinates x_sigma = x0 + sigma eps (Karras et al. 2022). The network is
preconditioned exactly as the teacher's `EDMEulerScheduler` does it (`precondition_inputs / _noise / _outputs`:
c_in, c_noise, c_skip, c_out), so D(x, sigma) is its denoised estimate, which is the consistency function. A step
is x0 = D(x, sigma_i), then re-noising x = x0 + sigma_{i+1} n (none after the last step). The noise levels of the
distilled 1- and 2-step samplers are in the config (`consistency_sigmas`); n > 2 steps use the parent's Karras grid
from the first of them down to sigma_min (multistep consistency sampling; not distilled). The start is
x = `start_noise_std` n: the TrigFlow start z ~ N(0, sigma_d^2 I) at the first noise level, read in EDM coordinates.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import EDMEulerScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_edm_euler import EDMEulerSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


class SCMEDMScheduler(EDMEulerScheduler):
    """EDMEulerScheduler's preconditioning with the consistency update (module docstring)."""

    __module__ = "scheduling_scm_edm"  # the name diffusers writes into model_index.json when a pipeline is saved
    _compatibles = ["EDMEulerScheduler"]  # its config keys (kept by the parent's __init__) load silently

    @register_to_config
    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 prediction_type: str = "epsilon", num_train_timesteps: int = 1000,
                 consistency_sigmas: tuple[float, ...] = (80.0, 1.0), start_noise_std: float = 80.0):  # fmt: skip
        super().__init__(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data,
                         num_train_timesteps=num_train_timesteps, prediction_type=prediction_type,
                         final_sigmas_type="zero")  # fmt: skip

    @property
    def init_noise_sigma(self) -> float:
        return self.config.start_noise_std

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None) -> None:
        n = num_inference_steps if num_inference_steps is not None else len(sigmas)
        if n < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {n}.")
        if n <= 2:
            levels = torch.tensor(list(self.config.consistency_sigmas)[:n], dtype=torch.float32)
        else:
            first = self.config.consistency_sigmas[0]
            levels = self._compute_karras_sigmas(torch.linspace(0, 1, n), sigma_max=first).float()
        self.num_inference_steps = n
        self.timesteps = self.precondition_noise(levels).to(device)
        self.sigmas = torch.cat([levels, torch.zeros(1)])  # on the CPU, as the parent keeps them
        self._step_index, self._begin_index = None, None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True) -> EDMEulerSchedulerOutput | tuple:  # fmt: skip
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        dtype = torch.promote_types(sample.dtype, torch.float32)  # 16-bit pipelines step in float32
        denoised = self.precondition_outputs(sample.to(dtype), model_output.to(dtype), sigma)
        prev = denoised
        if sigma_next > 0:
            noise = randn_tensor(denoised.shape, generator=generator, device=denoised.device, dtype=denoised.dtype)
            prev = denoised + sigma_next.to(denoised.device) * noise
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        return EDMEulerSchedulerOutput(prev_sample=prev, pred_original_sample=denoised) if return_dict else (prev,)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """The config, and this file next to it (diffusers drops repo code when it saves a pipeline)."""
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        shutil.copyfile(__file__, Path(save_directory) / "scheduling_scm_edm.py")
