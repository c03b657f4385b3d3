"""EDM teachers: an SDXL-layout text-to-image pipeline whose scheduler is EDM-preconditioned (`EDMEulerScheduler`,
`EDMDPMSolverMultistepScheduler`), the layout of Playground v2.5, the public EDM model of diffusers. (diffusers has no
EDM pixel pipeline: `DDPMPipeline` neither scales its input nor starts at the EDM noise level.)

The teacher process is EDM's x_sigma = x0 + sigma eps with sigma = sigma_d tan t (METHOD.md §2; `SigmaProcess` on
the scheduler's [sigma_min, sigma_max]); the network is read exactly as the scheduler reads it (the template's
`edm_denoise`): D(x, sigma) = c_skip x + c_out net(c_in x, c_noise), c_noise = log(sigma) / 4, with the
scheduler's own sigma_data and prediction type (EDM "epsilon" or "v_prediction" output scaling). Text conditioning,
CFG, the guidance input (`time_cond_proj_dim`), latents (per-channel statistics of Playground's VAE) and LoRA are the
SDXL family's (sd.py).

Student parameterization: the teacher's own preconditioned denoiser D ("sample" reading of the preconditioned
call). It is well-conditioned: F = (cos t x_t - D) / (sigma_d sin t) carries the network's error times
c_out / (sigma_d sin t) = s_data / sqrt(sigma_d^2 sin^2 t + s_data^2 cos^2 t) <= max(1, s_data / sigma_d) at every
t (s_data the scheduler's sigma_data): EDM's preconditioning is TrigFlow's, with unit gain when s_data = sigma_d,
and no conversion phase is needed. (A raw eps reading would divide the error by c_out -> 0 as sigma -> 0.)

Export: no stock consistency scheduler reads an EDM-preconditioned network (LCMScheduler and TCD are VP; the SDXL
pipeline would feed the UNet integer timesteps instead of c_noise), so the folder carries its own pipeline file,
`pipeline_scm_edm.py` (a StableDiffusionXLPipeline subclass), with the teacher's stock EDM scheduler config for the
preconditioning; its default call is the 2-step student and gives exactly this module's `consistency_samples`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import ClassVar

import diffusers
import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..export.card import write_model_card
from ..export.templates.pipeline_scm_edm import consistency_sigmas, edm_consistency_loop, edm_denoise
from ..lora import base_call, has_lora, merged_copy, save_lora
from ..parameterization import Condition, NativeModel, NetworkCall, Prediction
from ..processes import SigmaProcess
from .base import ExportInfo, component_class
from .guidance import GuidedModel
from .sd import StableDiffusionXLTeacher, quiet_loading, unet_call

EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
TEMPLATE = Path(__file__).resolve().parent.parent / "export" / "templates" / "pipeline_scm_edm.py"
PIPELINE_CLASS = "SCMEDMStableDiffusionXLPipeline"


def edm_call(call: NetworkCall, scheduler) -> NetworkCall:
    """A network call preconditioned as `scheduler` does it: (network, x_sigma, sigma [B], condition) -> D."""

    def precondition(network: torch.nn.Module, x: Tensor, sigma: Tensor, condition: Condition) -> Tensor:
        return edm_denoise(scheduler, lambda x_in, c_noise: call(network, x_in, c_noise, condition), x, sigma)

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
            raise ValueError(f"the teacher's {type(scheduler).__name__} has prediction type '{prediction}'; EDM "
                             f"preconditioning is defined for 'epsilon' and 'v_prediction'.")  # fmt: skip
        return GuidedModel(self.unet, edm_process(scheduler, sigma_d), "sample", sigma_d,
                           edm_call(base_call(unet_call), scheduler))  # fmt: skip

    @classmethod
    def matches(cls, model_index: dict) -> bool:
        return super().matches(model_index) and component_class(model_index, "scheduler") in EDM_SCHEDULERS

    def student_model(self, prediction: Prediction | None, dropout: float) -> NativeModel:
        """The SDXL family's student (guidance input or LoRA), read through the teacher's EDM preconditioning."""
        student = super().student_model(prediction, dropout)
        return NativeModel(student.network, student.process, student.prediction, student.sigma_d,
                           edm_call(unet_call, self.pipe.scheduler))  # fmt: skip

    def consistency_samples(self, model: NativeModel, shape: tuple[int, ...], num_steps: int, t_max: float,
                            t_mid: float, generator, condition: Condition | None = None,
                            device=None) -> Tensor:  # fmt: skip
        """The export's sampler (the template's loop): EDM coordinates, starting noise of the TrigFlow start."""
        if model.prediction != "sample":
            raise NotImplementedError(f"the EDM sampler reads the preconditioned denoiser, not {model.prediction}.")
        condition = condition or {}
        noise = randn_tensor(shape, generator=generator, device=device or self.device, dtype=torch.float32)
        sigmas = consistency_sigmas(t_max, t_mid, model.sigma_d, num_steps)
        return edm_consistency_loop(lambda x, sigma: model.network_call(model.network, x, sigma, condition), noise,
                                    sigmas, model.sigma_d, generator)  # fmt: skip

    def export(self, network: torch.nn.Module, folder: Path, info: ExportInfo) -> None:
        if info.prediction != "sample":
            raise NotImplementedError(f"the EDM export reads the preconditioned denoiser, not {info.prediction}.")
        lora = has_lora(network)
        unet = merged_copy(network) if lora else network
        components = {k: v for k, v in self.pipe.components.items() if v is not None and k != "unet"}
        with quiet_loading():
            pipe = self.pipeline_class().from_pretrained(self.folder, **components, unet=unet, variant=self.variant)
            pipe.save_pretrained(folder, safe_serialization=True)
        shutil.copyfile(TEMPLATE, folder / TEMPLATE.name)
        guided = unet.config.time_cond_proj_dim is not None
        index = json.loads((folder / "model_index.json").read_text())
        index.pop("_name_or_path", None)
        index.update({"_class_name": [TEMPLATE.stem, PIPELINE_CLASS], "t_max": info.t_max, "t_mid": info.t_mid,
                      "sigma_data": self.model.sigma_d, "guidance_scale": self.default_scale if guided else 1.0,
                      "height": self.resolution[0], "width": self.resolution[1],
                      "add_watermarker": False})  # fmt: skip
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if lora:
            save_lora(network, folder, diffusers.StableDiffusionXLPipeline)
        facts = {**info.card_facts, "sigma_data (measured on the latents)": f"{self.model.sigma_d:.4f}",
                 "EDM noise levels (2 steps)": [round(s, 5) for s in consistency_sigmas(info.t_max, info.t_mid,
                                                                                         self.model.sigma_d, 2)],
                 "guidance": self._guidance_fact({"guidance_scale": index["guidance_scale"]})}  # fmt: skip
        info = dataclasses.replace(info, sigma_data=round(self.model.sigma_d, 6), card_facts=facts)
        write_model_card(folder, info, usage=USAGE, pipeline_tag="text-to-image")


USAGE = """\
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("PATH_OR_REPO_ID", trust_remote_code=True)  # SCMEDMStableDiffusionXLPipeline
image = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images[0]  # 2 network evaluations
image.save("sample.png")"""
