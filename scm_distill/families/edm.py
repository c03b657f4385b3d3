"""EDM teachers: an SDXL-layout text-to-image pipeline whose scheduler is EDM-preconditioned (`EDMEulerScheduler`,
`EDMDPMSolverMultistepScheduler`), the layout of Playground v2.5, the public EDM model of diffusers. (diffusers has no
EDM pixel pipeline: `DDPMPipeline` neither scales its input nor starts at the EDM noise level.)

The teacher process is EDM's x_sigma = x0 + sigma eps with sigma = sigma_d tan t (METHOD.md §2; `SigmaProcess` on
the scheduler's [sigma_min, sigma_max]); the network is read exactly as the scheduler reads it:
D(x, sigma) = c_skip x + c_out net(c_in x, c_noise) with the scheduler's own `precondition_inputs / _noise /
_outputs` (its sigma_data and prediction type). Text conditioning, CFG, the guidance input (`time_cond_proj_dim`),
latents (per-channel statistics of Playground's VAE) and LoRA are the SDXL family's (sd.py).

Student parameterization: the teacher's own preconditioned denoiser D ("sample" reading of the preconditioned call).
It is well-conditioned: F = (cos t x_t - D) / (sigma_d sin t) carries the network's error times
c_out / (sigma_d sin t) = s_data / sqrt(sigma_d^2 sin^2 t + s_data^2 cos^2 t) <= max(1, s_data / sigma_d) at every
t (s_data the scheduler's sigma_data): EDM's preconditioning is TrigFlow's, and no conversion phase is needed.

Export: stock StableDiffusionXLPipeline (its call feeds `guidance_scale`, default 5.0, to the guidance input) with
the folder's `SCMEDMScheduler` (export/templates/scheduling_scm_edm.py): EDMEulerScheduler's preconditioning and
the consistency update at the distilled noise levels. No stock scheduler reads an EDM-preconditioned network with
consistency steps, hence this one code file.
"""

from __future__ import annotations

import math
from typing import ClassVar

import diffusers
import torch
from torch import Tensor

from ..errors import UserError
from ..export.contract import ExportDescription
from ..export.templates.scheduling_scm_edm import SCMEDMScheduler
from ..guidance import GuidedModel
from ..lora import base_call
from ..parameterization import Condition, NetworkCall
from ..processes import SigmaProcess
from ..trigflow import sigma_edm_from_t, t_from_log_sigma
from .base import ExportInfo, component_class
from .sd import StableDiffusionXLTeacher, unet_call

EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
EDM_MORE_STEPS = ("more steps take EDM's Karras grid from the first distilled noise level down to sigma_min "
                  "(multistep consistency sampling; not distilled)")  # fmt: skip


def edm_call(call: NetworkCall, scheduler) -> NetworkCall:
    """A network call preconditioned as `scheduler` does it: (network, x_sigma, sigma [B], condition) -> D."""

    def precondition(network: torch.nn.Module, x: Tensor, sigma: Tensor, condition: Condition) -> Tensor:
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        out = call(network, scheduler.precondition_inputs(x, s), scheduler.precondition_noise(sigma), condition)
        return scheduler.precondition_outputs(x, out.to(x.dtype), s)

    return precondition


def edm_process(scheduler, sigma_d: float) -> SigmaProcess:
    """x_sigma = x0 + sigma eps on the scheduler's training range [sigma_min, sigma_max]; the network gets sigma
    (the preconditioned call computes c_noise from it)."""
    config = scheduler.config
    return SigmaProcess(torch.tensor([config.sigma_min, config.sigma_max], dtype=torch.float64), sigma_d, "sigma")


class EDMStableDiffusionXLTeacher(StableDiffusionXLTeacher):
    family = "edm-sdxl"
    description = ("StableDiffusionXLPipeline with an EDM scheduler (EDMEulerScheduler, "
                   "EDMDPMSolverMultistepScheduler; Playground v2.5 layout), latent space, text + CFG")  # fmt: skip
    load_options: ClassVar[dict] = {}

    def _teacher_model(self, sigma_d: float) -> GuidedModel:
        scheduler = self.pipe.scheduler
        prediction = scheduler.config.prediction_type
        if prediction not in ("epsilon", "v_prediction"):
            raise UserError(f"the teacher's {type(scheduler).__name__} has prediction type '{prediction}'; EDM "
                             f"preconditioning is defined for 'epsilon' and 'v_prediction'.")  # fmt: skip
        return GuidedModel(self.unet, edm_process(scheduler, sigma_d), "sample", sigma_d,
                           edm_call(base_call(unet_call), scheduler))  # fmt: skip

    @classmethod
    def matches(cls, model_index: dict) -> bool:
        return model_index.get("_class_name") == cls.pipeline_name and \
            component_class(model_index, "scheduler") in EDM_SCHEDULERS  # fmt: skip

    def check_student(self, prediction) -> None:
        if prediction not in (None, "sample"):
            raise UserError(f"the EDM export reads the preconditioned denoiser, not {prediction}; leave "
                             f"student.prediction auto.")  # fmt: skip

    def student_call(self) -> NetworkCall:
        return edm_call(unet_call, self.pipe.scheduler)

    def scheduler(self, prediction: str, info: ExportInfo) -> SCMEDMScheduler:
        """The distilled noise levels sigma = sigma_d tan t, the start x = sqrt(sigma_0^2 + sigma_d^2) n (the TrigFlow
        z ~ N(0, sigma_d^2 I) at t_max read in EDM coordinates), the teacher's preconditioning."""
        config, sigma_d = self.pipe.scheduler.config, info.sigma_data
        sigmas = sigma_edm_from_t(torch.tensor([info.t_max, info.t_mid], dtype=torch.float64), sigma_d).tolist()
        return SCMEDMScheduler(sigma_min=config.sigma_min, sigma_max=config.sigma_max, sigma_data=config.sigma_data,
                               prediction_type=config.prediction_type, consistency_sigmas=sigmas,
                               start_noise_std=math.hypot(sigmas[0], sigma_d))  # fmt: skip

    def student_pipeline(self, network: torch.nn.Module, info: ExportInfo):
        components = {k: v for k, v in self.pipe.components.items() if k not in ("unet", "scheduler")}
        return diffusers.StableDiffusionXLPipeline(**components, unet=network, scheduler=self.scheduler("sample", info))

    def describe(self, pipeline, info: ExportInfo) -> ExportDescription:
        sigmas = list(pipeline.scheduler.config.consistency_sigmas)
        levels = {"1": sigmas[:1], "2": sigmas}
        times = {n: t_from_log_sigma(torch.tensor(v, dtype=torch.float64).log(), info.sigma_data).tolist()
                 for n, v in levels.items()}
        takes_scale = pipeline.unet.config.time_cond_proj_dim is not None and not self.fixed_scale
        return self.described(info, pipeline, True, times, levels, EDM_MORE_STEPS, **self.guidance_fields(takes_scale))
