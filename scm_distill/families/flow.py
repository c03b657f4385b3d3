"""Flow-matching transformer teachers (SD3, FLUX, Sana): the shared reading, student pipeline and description.

A flow teacher's transformer predicts the velocity u = eps - x0 of x_s = (1 - s) x0 + s eps on VAE latents, at
flow time s = sigma_d sin t / (cos t + sigma_d sin t) (METHOD.md §2; `FlowProcess`). The map is exact for any
sigma_d, which is measured on the latents; the scheduler's `shift` only moves its inference grid. The student keeps
the "flow" reading: it is already v-like, F = (cos t x_t - x0) / (sigma_d sin t) carries the error of u times
1 / (cos t + sigma_d sin t) <= 1 / min(1, sigma_d) at every t (student.py).

Sampler: the student's pipeline with `SCMFlowMatchScheduler` (export/templates/scheduling_scm_flow.py), a
FlowMatchLCMScheduler on the distilled flow times s_max, s_mid (re-noising from the pipeline's generator or, where
the stock pipeline passes none, from generators seeded by each sample's starting noise).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

import diffusers
import torch

from ..errors import UserError
from ..export.contract import ExportDescription
from ..export.templates.scheduling_scm_flow import SCMFlowMatchScheduler
from ..guidance import GuidedModel
from ..loading import check_trainable_weights, quiet_loading, require_transformers
from ..lora import base_call
from ..parameterization import NetworkCall
from ..processes import FlowProcess
from .base import ExportInfo
from .guided import GuidedLatentTeacher
from .latent import LatentSpace
from .vp import scheduler_config

FLOW_MORE_STEPS = ("more steps take the even grid s_max (1 - i / n) of the folder's scheduler (multistep consistency "
                   "sampling; not distilled)")  # fmt: skip


FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler",
                   "DPMSolverMultistepScheduler (use_flow_sigmas)")  # fmt: skip


def flow_schedule(config: dict) -> tuple[float, float, bool]:
    """(shift, s_min, dynamic shifting) of a flow-matching scheduler config; one-sentence error for others."""
    name = config.get("_class_name", "?")
    steps = config.get("num_train_timesteps", 1000)
    if name.startswith("FlowMatch"):
        shift, dynamic = config.get("shift", 1.0), bool(config.get("use_dynamic_shifting", False))
    elif name == "DPMSolverMultistepScheduler" and config.get("use_flow_sigmas"):
        if config.get("prediction_type") != "flow_prediction":
            raise UserError(f"scheduler '{name}' uses flow sigmas but prediction type "
                             f"'{config.get('prediction_type')}'; expected 'flow_prediction'.")  # fmt: skip
        shift, dynamic = config.get("flow_shift", 1.0), False
    else:
        raise UserError(f"scheduler '{name}' is not a flow-matching scheduler this adapter understands; supported: "
                         f"{', '.join(FLOW_SCHEDULERS)}.")  # fmt: skip
    u = 1 / steps  # the smallest training time, shifted as the scheduler shifts it
    return shift, shift * u / (1 + (shift - 1) * u), dynamic


# FLUX's resolution-dependent shift: mu linear in the image token count, shift = e^mu (exponential time shift).
def dynamic_shift(config: dict, image_seq_len: int) -> float:
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    mu = base + (top - base) * (image_seq_len - base_len) / (max_len - base_len)
    return math.exp(mu)


class FlowTeacher(GuidedLatentTeacher):
    """A text-to-image flow-matching pipeline; subclasses give the transformer call, prompt encoding, the student's
    guidance input and the student pipeline's class and extra components."""

    pipeline_name: ClassVar[str]
    network_call: ClassVar[NetworkCall]  # feeds (x [B, C, h, w], network time [B], condition) to the transformer

    def __init__(self, pipe, source: str, folder: Path, sigma_d: float):
        self.pipe, self.source, self.folder = pipe, source, Path(folder)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval().requires_grad_(False)
        self.denoiser = self.transformer = pipe.transformer
        self.space = LatentSpace(pipe.vae)
        self.scheduler_config = scheduler_config(pipe.scheduler)
        self.shift, self.s_min, self.dynamic_shift = flow_schedule(self.scheduler_config)
        self.resolution = self.default_resolution()
        self.reset_run_settings()
        self.model = self._teacher_model(sigma_d)

    @classmethod
    def pipeline_class(cls) -> type:
        return getattr(diffusers, cls.pipeline_name)

    @classmethod
    def matches(cls, model_index: dict) -> bool:
        return model_index.get("_class_name") == cls.pipeline_name

    @classmethod
    def from_pretrained(cls, folder: Path, source: str, sigma_d: float, device: torch.device,
                        dtype: torch.dtype, variant: str | None = None) -> FlowTeacher:  # fmt: skip
        require_transformers(source, cls.pipeline_name)
        check_trainable_weights(Path(folder), "transformer", source, device)
        with quiet_loading():
            pipe = cls.pipeline_class().from_pretrained(folder, torch_dtype=dtype, variant=variant)
        return cls(pipe.to(device), source, folder, sigma_d)

    def default_resolution(self) -> tuple[int, int]:
        size = self.transformer.config.sample_size
        return (size * self.space.downsampling,) * 2

    def _teacher_model(self, sigma_d: float) -> GuidedModel:
        shift = self.shift
        if self.dynamic_shift:
            h, w = self.space.latent_size(self.resolution)
            shift = dynamic_shift(self.scheduler_config, self.image_tokens(h, w))
        process = FlowProcess(sigma_d, self.time_scale(), self.s_min, shift)
        return GuidedModel(self.transformer, process, "flow", sigma_d, base_call(type(self).network_call))

    def student_call(self) -> NetworkCall:
        return type(self).network_call

    def time_scale(self) -> float:
        """Network time per unit of flow time s (SD3 and Sana's pipelines feed 1000 s)."""
        return 1000.0

    def image_tokens(self, h: int, w: int) -> int:
        """Image tokens of an h x w latent (patch_size^2 latent pixels per token)."""
        patch = self.transformer.config.get("patch_size", 1) or 1
        return (h // patch) * (w // patch)

    def check_student(self, prediction) -> None:
        if prediction not in (None, "flow"):
            raise UserError(f"the flow exports read a flow student, not {prediction}.")

    # --- the student's pipeline ------------------------------------------------------------------------------

    def flow_scheduler(self, info: ExportInfo) -> SCMFlowMatchScheduler:
        """The distilled flow times s = flow_time(t) of t_max and t_mid, exactly (FlowProcess)."""
        s_max, s_mid = self.model.process.flow_time(torch.tensor([info.t_max, info.t_mid], dtype=torch.float64))
        return SCMFlowMatchScheduler(num_train_timesteps=self.scheduler_config.get("num_train_timesteps", 1000),
                                     s_max=float(s_max), s_mid=float(s_mid))  # fmt: skip

    @abstractmethod
    def pipeline_parts(self, network: torch.nn.Module) -> tuple[type, dict]:
        """(pipeline class, the components that hold the student: transformer and, if any, guidance_embedder)."""

    def student_pipeline(self, network: torch.nn.Module, info: ExportInfo):
        pipeline_class, parts = self.pipeline_parts(network)
        components = {k: v for k, v in self.pipe.components.items() if k not in ("transformer", "scheduler")}
        return pipeline_class(**components, **parts, scheduler=self.flow_scheduler(info))

    def lora_adapters(self, network: torch.nn.Module):
        return self.pipeline_class(), "transformer"

    def describe(self, pipeline, info: ExportInfo) -> ExportDescription:
        config = pipeline.scheduler.config
        flow = {"1": [config.s_max], "2": [config.s_max, config.s_mid]}
        times = {n: self.model.process.t_at(torch.tensor(s, dtype=torch.float64)).tolist() for n, s in flow.items()}
        return self.described(info, pipeline, True, times, flow, FLOW_MORE_STEPS,
                              **self.guidance_fields(not self.fixed_scale))
