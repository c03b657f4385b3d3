"""Pixel-space teachers: a diffusers `UNet2DModel` with a DDPM-family scheduler (e.g. `DDPMPipeline`).

Export: stock `DDPMPipeline` with the student as a `UNet2DModel` (v-prediction on the teacher's schedule) and a
stock `LCMScheduler` whose `original_inference_steps` put the distilled times on its 2-step grid (vp.py):
`pipe(batch_size=16, num_inference_steps=2)` is the student (DDPMPipeline passes its generator to the scheduler,
so the generator fixes the samples). The export reads back as a teacher of this family.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMPipeline, UNet2DModel
from torch import Tensor

from ..data import check_compatible
from ..errors import UserError
from ..export.contract import ExportDescription
from ..parameterization import Condition, NativeModel, freeze, unet2d_call
from .base import ExportInfo, Teacher, component_class
from .vp import LCM_MORE_STEPS, lcm_original_steps, lcm_scheduler, lcm_times, vp_prediction, vp_process


class UNet2DTeacher(Teacher):
    family = "unet2d-vp"
    description = "UNet2DModel + a DDPM-family scheduler (DDPMPipeline, DDIMPipeline), pixel space"

    def __init__(self, unet: UNet2DModel, scheduler_config: dict, source: str, folder: Path, sigma_d: float):
        self.unet = freeze(unet)
        self.scheduler_config = scheduler_config
        self.source, self.folder = source, folder
        self.model = NativeModel(unet, vp_process(scheduler_config, sigma_d), vp_prediction(scheduler_config),
                                 sigma_d, unet2d_call)  # fmt: skip

    @classmethod
    def matches(cls, model_index: dict) -> bool:
        return component_class(model_index, "unet") == "UNet2DModel"

    @classmethod
    def from_pretrained(cls, folder: Path, source: str, sigma_d: float, device: torch.device,
                        dtype: torch.dtype, variant: str | None = None) -> UNet2DTeacher:  # fmt: skip
        config_path = folder / "scheduler" / "scheduler_config.json"
        if not config_path.is_file():
            raise UserError(f"teacher '{source}' has no scheduler/scheduler_config.json.")
        scheduler_config = json.loads(config_path.read_text())
        unet = UNet2DModel.from_pretrained(folder / "unet", torch_dtype=dtype, variant=variant).to(device)
        return cls(unet, scheduler_config, source, folder, sigma_d)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)

    @property
    def num_classes(self) -> int | None:
        return self.unet.config.num_class_embeds

    def check_data(self, images) -> None:
        check_compatible(images, self.sample_shape[0], self.sample_shape[1:])

    def configure(self, config) -> None:
        super().configure(config)
        if self.num_classes is not None:
            raise UserError(f"teacher '{self.source}' is a class-conditional UNet2DModel, which DDPMPipeline cannot "
                             f"call with labels; only unconditional UNet2DModel teachers are supported.")  # fmt: skip

    def check_student(self, prediction) -> None:
        if prediction not in (None, "epsilon", "v_prediction", "sample"):
            raise UserError(f"LCMScheduler cannot read a {prediction} student; use v_prediction, epsilon or sample.")

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Condition]:
        return batch["image"].to(self.unet.device, torch.float32), {}

    def decode(self, x0: Tensor) -> Tensor:
        return x0

    def student_pipeline(self, network: torch.nn.Module, info: ExportInfo) -> DDPMPipeline:
        K = lcm_original_steps(self.model.process, info.t_max, info.t_mid)
        return DDPMPipeline(unet=network, scheduler=lcm_scheduler(self.scheduler_config, info.prediction, K))

    def describe(self, pipeline, info: ExportInfo) -> ExportDescription:
        times, timesteps = lcm_times(self.model.process, pipeline.scheduler)
        return self.described(info, pipeline, False, times, timesteps, LCM_MORE_STEPS)
