"""Stable Diffusion teachers: SD 1.x / 2.x (`StableDiffusionPipeline`) and SDXL (`StableDiffusionXLPipeline`).

A `UNet2DConditionModel` on VAE latents with a DDPM-family schedule (vp.py), conditioned on CLIP text states (SDXL:
two encoders, pooled text and size/crop "time ids"), read with classifier-free guidance (guided.py) against the
negative prompt, encoded by the pipeline's own `encode_prompt` rules.

Students: the full student is the teacher's UNet with `time_cond_proj_dim` (diffusers' LCM guidance input), whose
projection starts at zero. A LoRA student keeps the teacher's UNet and distills CFG at one scale.

Export: the stock pipeline with a stock `LCMScheduler` whose `original_inference_steps` put the distilled times on
its 2-step grid (vp.py): `pipe(prompt, num_inference_steps=2)` is the student. The stock pipeline feeds
`guidance_scale` (default 7.5 for SD, 5.0 for SDXL) to the guidance input and runs no CFG branch for a UNet that has
one, so the distilled default is the stock default. A LoRA export is the merged UNet with the guidance input at
zero (the call ignores the scale), plus the adapters for the original teacher in `lora/`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import ClassVar

import diffusers
import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from ..errors import UserError
from ..export.contract import ExportDescription
from ..guidance import GuidedModel, guidance_embedding
from ..loading import check_trainable_weights, quiet_loading, require_transformers
from ..lora import base_call
from ..parameterization import Condition
from .base import ExportInfo, Inputs, component_class
from .guidance_inputs import unet_with_guidance_input
from .guided import GuidedLatentTeacher
from .latent import LatentSpace
from .vp import (
    LCM_MORE_STEPS,
    lcm_original_steps,
    lcm_scheduler,
    lcm_times,
    scheduler_config,
    vp_prediction,
    vp_process,  # fmt: skip
)


def unet_call(network: torch.nn.Module, x: Tensor, time: Tensor, condition: Condition) -> Tensor:
    """Feeds a UNet2DConditionModel: text states, SDXL's added conditioning and, for students with a guidance
    input, the embedding of condition["guidance"] as `timestep_cond` (what the stock pipelines pass)."""
    added = {"text_embeds": condition["text_embeds"], "time_ids": condition["time_ids"]} \
        if "text_embeds" in condition else None  # fmt: skip
    dim = network.config.time_cond_proj_dim
    timestep_cond = guidance_embedding(condition["guidance"], dim).to(x.dtype) if dim else None
    return network(x, time, encoder_hidden_states=condition["encoder_hidden_states"], timestep_cond=timestep_cond,
                   added_cond_kwargs=added).sample  # fmt: skip


def stock_guidance_default(pipeline_class) -> float:
    return inspect.signature(pipeline_class.__call__).parameters["guidance_scale"].default


class StableDiffusionTeacher(GuidedLatentTeacher):
    family = "sd"
    description = "StableDiffusionPipeline (SD 1.x / 2.x, epsilon or v_prediction), latent space, text + CFG"
    pipeline_name: ClassVar[str] = "StableDiffusionPipeline"
    stock_guidance: ClassVar[float] = 7.5
    load_options: ClassVar[dict] = {"safety_checker": None, "requires_safety_checker": False}

    def __init__(self, pipe, source: str, folder: Path, sigma_d: float, variant: str | None = None):
        self.pipe, self.source, self.folder, self.variant = pipe, source, Path(folder), variant
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval().requires_grad_(False)
        self.denoiser = self.unet = pipe.unet
        self.space = LatentSpace(pipe.vae)
        self.scheduler_config = scheduler_config(pipe.scheduler)
        self.resolution = self.default_resolution()
        self.reset_run_settings()
        self.model = self._teacher_model(sigma_d)

    def default_resolution(self) -> tuple[int, int]:
        """The stock pipeline's default size: the UNet's sample_size in pixels."""
        size = self.unet.config.sample_size
        return tuple(s * self.space.downsampling for s in ((size, size) if isinstance(size, int) else size))

    @classmethod
    def pipeline_class(cls) -> type:
        return getattr(diffusers, cls.pipeline_name)  # diffusers imports pipelines lazily

    def _teacher_model(self, sigma_d: float) -> GuidedModel:
        return GuidedModel(self.unet, vp_process(self.scheduler_config, sigma_d), vp_prediction(self.scheduler_config),
                           sigma_d, base_call(unet_call))  # fmt: skip

    @classmethod
    def matches(cls, model_index: dict) -> bool:
        return model_index.get("_class_name") == cls.pipeline_name and \
            component_class(model_index, "unet") == "UNet2DConditionModel" and \
            component_class(model_index, "scheduler") not in ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")

    @classmethod
    def from_pretrained(cls, folder: Path, source: str, sigma_d: float, device: torch.device,
                        dtype: torch.dtype, variant: str | None = None) -> StableDiffusionTeacher:  # fmt: skip
        require_transformers(source, cls.pipeline_name)
        variant = variant or check_trainable_weights(Path(folder), "unet", source, device)
        with quiet_loading():
            pipe = cls.pipeline_class().from_pretrained(folder, torch_dtype=dtype, variant=variant, **cls.load_options)
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise UserError(f"teacher '{source}' already takes a guidance-scale input (a guidance-distilled UNet); "
                             f"distill the model it was distilled from.")  # fmt: skip
        return cls(pipe.to(device), source, folder, sigma_d, variant)

    # --- conditions ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, inputs: Inputs) -> Condition:
        states, _ = self.pipe.encode_prompt(list(inputs["prompt"]), self.device, 1, False)
        return {"encoder_hidden_states": states}

    @torch.no_grad()
    def encode_negative(self) -> Condition:
        negative = [self.negative_prompt] if self.negative_prompt else None
        _, states = self.pipe.encode_prompt([""], self.device, 1, True, negative)
        return {"encoder_hidden_states": states}

    # --- students and exports --------------------------------------------------------------------------------

    def check_student(self, prediction) -> None:
        if prediction not in (None, "epsilon", "v_prediction", "sample"):
            raise UserError(f"LCMScheduler cannot read a {prediction} student; use v_prediction, epsilon or sample.")

    def student_call(self):
        return unet_call

    def guided_network(self, dropout: float) -> UNet2DConditionModel:
        return unet_with_guidance_input(self.unet, self.embedding_dim).train().requires_grad_(True)

    def zero_guidance_input(self, network: UNet2DConditionModel) -> UNet2DConditionModel:
        return unet_with_guidance_input(network, self.embedding_dim)

    def scheduler(self, prediction: str, info: ExportInfo):
        return lcm_scheduler(self.scheduler_config, prediction, lcm_original_steps(self.model.process, info.t_max,
                                                                                   info.t_mid))  # fmt: skip

    def student_pipeline(self, network: torch.nn.Module, info: ExportInfo):
        components = {k: v for k, v in self.pipe.components.items() if k not in ("unet", "scheduler")}
        scheduler = self.scheduler(info.prediction, info)
        return self.pipeline_class()(**components, unet=network, scheduler=scheduler)

    def lora_adapters(self, network: torch.nn.Module):
        return self.pipeline_class(), "unet"

    def describe(self, pipeline, info: ExportInfo) -> ExportDescription:
        times, timesteps = lcm_times(self.model.process, pipeline.scheduler)
        takes_scale = pipeline.unet.config.time_cond_proj_dim is not None and not self.fixed_scale
        return self.described(info, pipeline, False, times, timesteps, LCM_MORE_STEPS,
                              **self.guidance_fields(takes_scale))


class StableDiffusionXLTeacher(StableDiffusionTeacher):
    family = "sdxl"
    description = "StableDiffusionXLPipeline (two text encoders, added text/time conditioning), latent space, CFG"
    pipeline_name: ClassVar[str] = "StableDiffusionXLPipeline"
    stock_guidance: ClassVar[float] = 5.0
    load_options: ClassVar[dict] = {}

    def _time_ids(self, n: int, dtype: torch.dtype) -> Tensor:
        """SDXL's micro-conditioning (original size, crop top-left, target size) = the training resolution, no
        crop: what the pipeline passes when called at that height and width."""
        h, w = self.resolution
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype).to(self.device).repeat(n, 1)

    @torch.no_grad()
    def encode(self, inputs: Inputs) -> Condition:
        prompts = list(inputs["prompt"])
        states, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)  # fmt: skip
        return {"encoder_hidden_states": states, "text_embeds": pooled,
                "time_ids": self._time_ids(len(prompts), states.dtype)}  # fmt: skip

    @torch.no_grad()
    def encode_negative(self) -> Condition:
        negative = [self.negative_prompt] if self.negative_prompt else None
        _, states, _, pooled = self.pipe.encode_prompt([""], device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True, negative_prompt=negative)
        return {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": self._time_ids(1, states.dtype)}
