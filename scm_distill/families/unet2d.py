"""Pixel-space teachers: a diffusers `UNet2DModel` with a DDPM-family scheduler (e.g. `DDPMPipeline`).

The export is a pipeline folder with the student as a `UNet2DModel` (v-prediction on the teacher's schedule),
a stock `DDPMScheduler` config that says so, and `pipeline_scm_unet2d.py`, a self-contained 2-step sampler
(stock `DDPMPipeline` takes no custom timesteps, so it cannot land at t_mid; ECOSYSTEM.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor

from ..data import check_compatible
from ..errors import UserError
from ..export.card import write_model_card
from ..parameterization import Condition, NativeModel, freeze, unet2d_call
from .base import ExportInfo, Teacher, component_class
from .vp import vp_prediction, vp_process, vp_schedule_config

TEMPLATE = Path(__file__).resolve().parent.parent / "export" / "templates" / "pipeline_scm_unet2d.py"
PIPELINE_CLASS = "SCMUNet2DPipeline"


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
                        dtype: torch.dtype) -> UNet2DTeacher:  # fmt: skip
        config_path = folder / "scheduler" / "scheduler_config.json"
        if not config_path.is_file():
            raise ValueError(f"teacher '{source}' has no scheduler/scheduler_config.json.")
        scheduler_config = json.loads(config_path.read_text())
        unet = UNet2DModel.from_pretrained(folder / "unet", torch_dtype=dtype).to(device)
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
        if self.num_classes is not None and images.num_classes is None:
            raise ValueError(f"the teacher is class-conditional but data '{images.name}' has no labels.")

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Condition]:
        x0 = batch["image"].to(self.unet.device, torch.float32)
        if self.num_classes is None:
            return x0, {}
        return x0, {"class_labels": batch["label"].to(self.unet.device)}

    def decode(self, x0: Tensor) -> Tensor:
        return x0

    def sample_condition(self, batch_size: int, generator: torch.Generator) -> Condition:
        if self.num_classes is None:
            return {}
        labels = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        return {"class_labels": labels.to(self.unet.device)}

    def check_student(self, prediction) -> None:
        if self.num_classes is not None:
            raise UserError("export of class-conditional UNet2DModel students is not supported yet.")
        if prediction != "v_prediction":
            raise UserError(f"the UNet2DModel export needs a v-prediction student, not {prediction}; set "
                            f"student.prediction to auto or v_prediction.")  # fmt: skip

    def export(self, network: torch.nn.Module, folder: Path, info: ExportInfo) -> None:
        if self.num_classes is not None:
            raise NotImplementedError("export of class-conditional UNet2DModel students is not supported yet.")
        if info.prediction != "v_prediction":
            raise NotImplementedError(f"the UNet2DModel export needs a v-prediction student, not {info.prediction}.")
        network.save_pretrained(folder / "unet", safe_serialization=True)
        schedule = vp_schedule_config(self.scheduler_config)
        DDPMScheduler(**schedule, prediction_type="v_prediction", clip_sample=False).save_pretrained(
            folder / "scheduler"
        )
        shutil.copyfile(TEMPLATE, folder / TEMPLATE.name)
        model_index = {
            "_class_name": [TEMPLATE.stem, PIPELINE_CLASS],
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "DDPMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
            "sigma_data": info.sigma_data,
            "t_max": info.t_max,
            "t_mid": info.t_mid,
        }
        (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
        usage = USAGE.format(folder="PATH_OR_REPO_ID")
        write_model_card(folder, info, usage=usage, pipeline_tag="unconditional-image-generation")


USAGE = """\
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{folder}", trust_remote_code=True)
images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0)).images  # 2 network evaluations
images[0].save("sample.png")"""
