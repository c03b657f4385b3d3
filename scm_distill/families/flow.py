"""Flow-matching transformer teachers (SD3, FLUX, Sana): the shared adapter, sampler and export plumbing.

A flow teacher's transformer predicts the velocity u = eps - x0 of x_s = (1 - s) x0 + s eps on VAE latents, at
flow time s = sigma_d sin t / (cos t + sigma_d sin t) (METHOD.md §2; `FlowProcess`). The map is exact for any
sigma_d, which is measured on the latents as for SD; the scheduler's `shift` only moves its inference grid. The
student keeps the "flow" reading: it is already v-like, F = (cos t x_t - x0) / (sigma_d sin t) carries the error
of u times 1 / (cos t + sigma_d sin t) <= 1 / min(1, sigma_d) at every t (student.py). Conditions carry the
guidance scale under "guidance" (the student's guidance input, and the teacher's own for guidance-distilled
checkpoints); teachers without a guidance input are read with CFG (guidance.py: "uncond", "guidance_scale").

Sampling (`consistency_samples`): the export's sampler, a stock `FlowMatchLCMScheduler` at explicit flow times
(flow_lcm.py). Exports: the stock pipeline + FlowMatchLCMScheduler + the exact call in scm_call.json
(`export_stock`), or the stock components + this folder's own pipeline file (`export_pipeline_file`,
export/templates/pipeline_scm_flow.py) where the stock pipeline cannot feed the student's guidance input.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import diffusers
import torch
from torch import Tensor

from ..export.call import CALL_FILE
from ..export.card import write_model_card
from ..lora import WEIGHTS_NAME, add_lora, base_call, check_lora, has_lora, lora_state_dict, merged_copy
from ..parameterization import Condition, NativeModel, NetworkCall, Prediction, freeze
from ..processes import FlowProcess
from ..student import set_dropout, student_prediction
from .base import ExportInfo
from .flow_lcm import consistency_sigmas, flow_lcm_consistency_samples, flow_lcm_scheduler
from .guidance import GuidedModel, expand_condition, sample_guidance_scales
from .guided_latent import GuidedLatentTeacher
from .latent import LatentSpace
from .sd import half_precision_only, quiet_loading
from .vp import scheduler_config

if TYPE_CHECKING:
    from ..config import DistillConfig

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler",
                   "DPMSolverMultistepScheduler (use_flow_sigmas)")  # fmt: skip
TEMPLATE = Path(__file__).resolve().parent.parent / "export" / "templates" / "pipeline_scm_flow.py"


def flow_schedule(config: dict) -> tuple[float, float, bool]:
    """(shift, s_min, dynamic shifting) of a flow-matching scheduler config; one-sentence error for others."""
    name = config.get("_class_name", "?")
    steps = config.get("num_train_timesteps", 1000)
    if name.startswith("FlowMatch"):
        shift, dynamic = config.get("shift", 1.0), bool(config.get("use_dynamic_shifting", False))
    elif name == "DPMSolverMultistepScheduler" and config.get("use_flow_sigmas"):
        if config.get("prediction_type") != "flow_prediction":
            raise ValueError(f"scheduler '{name}' uses flow sigmas but prediction type "
                             f"'{config.get('prediction_type')}'; expected 'flow_prediction'.")  # fmt: skip
        shift, dynamic = config.get("flow_shift", 1.0), False
    else:
        raise ValueError(f"scheduler '{name}' is not a flow-matching scheduler this adapter understands; supported: "
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
    guidance input and the export."""

    pipeline_name: ClassVar[str]
    lora_supported = True
    network_call: ClassVar[NetworkCall]  # feeds (x [B, C, h, w], network time [B], condition) to the transformer
    extra_call_kwargs: ClassVar[dict] = {}  # keyword arguments the stock pipeline's exact call also needs

    def __init__(self, pipe, source: str, folder: Path, sigma_d: float, variant: str | None = None):
        self.pipe, self.source, self.folder, self.variant = pipe, source, Path(folder), variant
        self.transformer = freeze(pipe.transformer)
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and name != "transformer":
                freeze(component)
        self.space = LatentSpace(pipe.vae)
        self.scheduler_config = scheduler_config(pipe.scheduler)
        self.shift, self.s_min, self.dynamic_shift = flow_schedule(self.scheduler_config)
        self.resolution = self.default_resolution()
        self.reset_run_settings()
        self.model = self._teacher_model(sigma_d)

    # --- loading -------------------------------------------------------------------------------------------

    @classmethod
    def pipeline_class(cls) -> type:
        return getattr(diffusers, cls.pipeline_name)

    @classmethod
    def matches(cls, model_index: dict) -> bool:
        return model_index.get("_class_name") == cls.pipeline_name

    @classmethod
    def from_pretrained(cls, folder: Path, source: str, sigma_d: float, device: torch.device,
                        dtype: torch.dtype) -> FlowTeacher:  # fmt: skip
        if importlib.util.find_spec("transformers") is None:
            raise ValueError(f"teacher '{source}' is a {cls.pipeline_name}, which needs transformers: "
                             f"pip install 'scm-distill[text]'.")  # fmt: skip
        cls.check_weights(Path(folder), source, device)
        with quiet_loading():
            pipe = cls.pipeline_class().from_pretrained(folder, torch_dtype=dtype)
        return cls(pipe.to(device), source, folder, sigma_d)

    @classmethod
    def check_weights(cls, folder: Path, source: str, device: torch.device) -> None:
        if half_precision_only(folder / "transformer") and device.type == "cpu":
            raise ValueError(f"teacher '{source}' has only 16-bit transformer weights, which are meant for GPUs (on "
                             f"the CPU the toolkit trains in float32); run on a GPU or give float32 "
                             f"weights.")  # fmt: skip

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

    def time_scale(self) -> float:
        """Network time per unit of flow time s (SD3 and Sana's pipelines feed 1000 s)."""
        return 1000.0

    def image_tokens(self, h: int, w: int) -> int:
        """Image tokens of an h x w latent (patch_size^2 latent pixels per token)."""
        patch = self.transformer.config.get("patch_size", 1) or 1
        return (h // patch) * (w // patch)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.space.channels, *self.space.latent_size(self.resolution))

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def native_guidance(self) -> bool:
        """A guidance-distilled teacher (FLUX-dev, SANA-Sprint-like): it takes s itself and is read without CFG."""
        return bool(self.transformer.config.get("guidance_embeds", False))

    def configure(self, config: DistillConfig) -> None:
        """Guidance and latent settings; a LoRA student of a teacher without a guidance input cannot take s, so it
        distills CFG at guidance.scale."""
        super().configure(config)
        if config.lora.rank:
            check_lora(self.transformer, config.lora.rank, config.lora.target_modules)
            if not self.native_guidance:
                self.scales = (config.guidance.scale, config.guidance.scale)

    def check_data(self, images) -> None:
        if not images.has_captions:
            raise ValueError(f"the teacher is text-conditioned but data '{images.name}' has no captions (an image "
                             f"folder needs a metadata.jsonl with a 'text' field).")  # fmt: skip
        self.space.check_images(images)

    # --- conditions ----------------------------------------------------------------------------------------

    @abstractmethod
    def text_condition(self, prompts: list[str]) -> Condition:
        """Network inputs for a list of prompts, as the pipeline computes them."""

    @abstractmethod
    def negative_condition(self) -> Condition:
        """Network inputs of CFG's unconditional branch (batch 1), by the pipeline's negative-prompt rules."""

    def condition(self, prompts: list[str], scales: Tensor | float) -> Condition:
        """Text inputs and the guidance scales s [B] ("guidance"); for teachers without a guidance input also the
        CFG branch ("uncond", which carries "guidance" too so that both branches stack) and "guidance_scale"."""
        n = len(prompts)
        s = (torch.full((n,), float(scales)) if not isinstance(scales, Tensor) else scales).to(self.device,
                                                                                                torch.float32)
        condition = {**self.text_condition(prompts), "guidance": s}
        if self.native_guidance:
            return condition
        if self._negative is None:
            self._negative = self.negative_condition()
        return {**condition, "uncond": {**expand_condition(self._negative, n), "guidance": s}, "guidance_scale": s}

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Condition]:
        x0 = self.encode_batch(batch, self.device)
        s = sample_guidance_scales(x0.shape[0], *self.scales, generator)
        return x0, self.condition(batch["caption"], s)

    def prompt_condition(self, prompts: list[str]) -> Condition:
        return self.condition(list(prompts), self.default_scale)

    def sample_condition(self, batch_size: int, generator: torch.Generator) -> Condition:
        pool = self.prompts or ("",)
        return self.prompt_condition([pool[i % len(pool)] for i in range(batch_size)])

    def prepare(self, images) -> None:
        super().prepare(images)
        if not self.prompts:
            self.prompts = tuple(images[i]["caption"] for i in range(min(len(images), 8)))

    # --- students and sampling -----------------------------------------------------------------------------

    @abstractmethod
    def network_with_guidance_input(self, dropout: float) -> torch.nn.Module:
        """A trainable copy of the transformer that takes condition["guidance"], starting equal to the teacher."""

    def student_model(self, prediction: Prediction | None, dropout: float) -> NativeModel:
        """Full: the transformer with a guidance input. LoRA: the teacher's own transformer with adapters."""
        if self.uses_lora:
            lora = self.lora
            network = add_lora(self.transformer, lora.rank, lora.alpha, lora.target_modules, self.seed)
        else:
            network = self.network_with_guidance_input(dropout)
            set_dropout(network, dropout)
        teacher = self.model
        return NativeModel(network, teacher.process, prediction or student_prediction(teacher), teacher.sigma_d,
                           type(self).network_call)  # fmt: skip

    def pipeline_time(self, t: Tensor, latents: Tensor) -> Tensor:
        """The network time the pipeline feeds for scheduler timestep t (= 1000 s)."""
        return t

    def pack(self, x: Tensor) -> Tensor:
        return x

    def unpack(self, x: Tensor) -> Tensor:
        return x

    def consistency_samples(self, model: NativeModel, shape: tuple[int, ...], num_steps: int, t_max: float,
                            t_mid: float, generator, condition: Condition | None = None,
                            device=None) -> Tensor:  # fmt: skip
        """The export's sampler: FlowMatchLCMScheduler at the flow times of the sCM times (module docstring)."""
        if model.prediction != "flow":
            raise NotImplementedError(f"the flow sampler reads a flow student, not {model.prediction}.")
        sigmas = consistency_sigmas(model.process, num_steps, t_max, t_mid)
        return flow_lcm_consistency_samples(model, shape, sigmas, generator, condition or {}, device or self.device,
                                            self.pipeline_time, self.pack, self.unpack)  # fmt: skip

    # --- export helpers ------------------------------------------------------------------------------------

    def guidance_fact(self) -> str:
        if self.uses_lora and not self.native_guidance:
            return f"CFG at s = {self.default_scale} distilled into the LoRA student (call with guidance_scale=1)"
        where = "the teacher's guidance embedding" if self.native_guidance else "student input (zero-initialised)"
        return f"{where}, trained on s ~ U[{self.scales[0]}, {self.scales[1]}], default {self.default_scale}"

    def save_lora(self, network: torch.nn.Module, folder: Path) -> Path:
        """The adapters in diffusers' format, for `pipe.load_lora_weights(folder)` on the original teacher."""
        metadata = network.peft_config["scm"].to_dict()
        metadata["target_modules"] = sorted(metadata["target_modules"])
        self.pipeline_class().save_lora_weights(folder, transformer_lora_layers=lora_state_dict(network),
                                                weight_name=WEIGHTS_NAME, transformer_lora_adapter_metadata=metadata,
                                                safe_serialization=True)  # fmt: skip
        return folder / WEIGHTS_NAME


    def call_kwargs(self, sigmas: list[float], guided: bool) -> dict:
        """Keyword arguments of the exact call of a stock pipeline (guidance_scale 1 = no CFG for LoRA students of
        teachers without a guidance input)."""
        kwargs = {"sigmas": sigmas, "guidance_scale": self.default_scale if guided else 1.0}
        return {**kwargs, "height": self.resolution[0], "width": self.resolution[1], **self.extra_call_kwargs}

    def save_pipeline(self, transformer: torch.nn.Module, folder: Path) -> dict:
        """The teacher's pipeline with the student's transformer and a FlowMatchLCMScheduler, saved to `folder`;
        returns its model_index.json (without the teacher's local path)."""
        components = {k: v for k, v in self.pipe.components.items() if v is not None and k not in ("transformer",
                                                                                                    "scheduler")}
        with quiet_loading():
            pipe = self.pipeline_class().from_pretrained(self.folder, **components, transformer=transformer,
                                                         scheduler=flow_lcm_scheduler())  # fmt: skip
            pipe.save_pretrained(folder, safe_serialization=True)
        index = json.loads((folder / "model_index.json").read_text())
        index.pop("_name_or_path", None)
        return index

    def export_stock(self, network: torch.nn.Module, folder: Path, info: ExportInfo) -> None:
        """Stock pipeline + stock FlowMatchLCMScheduler + scm_call.json (the exact call) + the model card; LoRA runs
        also write the adapters for the original teacher."""
        lora = has_lora(network)
        transformer = merged_copy(network) if lora else network
        write_json(folder / "model_index.json", self.save_pipeline(transformer, folder))
        guided = bool(transformer.config.get("guidance_embeds", False))
        calls = {f"{n}_step{'s' * (n > 1)}": self.call_kwargs(consistency_sigmas(self.model.process, n, info.t_max,
                                                                                 info.t_mid), guided)
                 for n in (2, 1)}  # fmt: skip
        write_json(folder / CALL_FILE, calls)
        if lora:
            self.save_lora(network, folder)
        usage = stock_usage(self.pipeline_name, calls["2_steps"], lora, info.base_model)
        self.write_card(folder, info, calls["2_steps"]["sigmas"], usage)

    def export_pipeline_file(self, transformer: torch.nn.Module, folder: Path, info: ExportInfo,
                             pipeline_class: str, extra: dict | None = None) -> None:  # fmt: skip
        """The stock pipeline's components with the student, plus this folder's own pipeline file
        (pipeline_scm_flow.py) whose default call is the 2-step student; `extra` adds model_index entries."""
        index = self.save_pipeline(transformer, folder)
        shutil.copyfile(TEMPLATE, folder / TEMPLATE.name)
        sigmas = consistency_sigmas(self.model.process, 2, info.t_max, info.t_mid)
        index.update({"_class_name": [TEMPLATE.stem, pipeline_class], "sigmas": sigmas,
                      "guidance_scale": self.default_scale, "height": self.resolution[0],
                      "width": self.resolution[1], **(extra or {})})  # fmt: skip
        write_json(folder / "model_index.json", index)
        self.write_card(folder, info, sigmas, FILE_USAGE.format(cls=pipeline_class))

    def write_card(self, folder: Path, info: ExportInfo, sigmas: list[float], usage: str) -> None:
        facts = {**info.card_facts, "sigma_data (measured on the latents)": f"{self.model.sigma_d:.4f}",
                 "flow times s (2 steps)": [round(s, 6) for s in sigmas], "guidance": self.guidance_fact()}  # fmt: skip
        info = dataclasses.replace(info, sigma_data=round(self.model.sigma_d, 6), card_facts=facts)
        write_model_card(folder, info, usage=usage, pipeline_tag="text-to-image")


FILE_USAGE = """\
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("PATH_OR_REPO_ID", trust_remote_code=True)  # {cls}
image = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images[0]  # 2 network evaluations
image.save("sample.png")"""


def stock_usage(pipeline_name: str, call: dict, lora: bool, base_model: str) -> str:
    """The model card's exact call. The stock flow pipelines do not hand their generator to the scheduler, so the
    re-noising noise comes from torch's global generator: seed it (the toolkit's samples for seed k are the call
    after torch.manual_seed(k) without a generator)."""
    args = ", ".join(f"{key}={value!r}" for key, value in call.items())
    text = f"""import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("PATH_OR_REPO_ID")  # {pipeline_name} + FlowMatchLCMScheduler
torch.manual_seed(0)  # {pipeline_name} draws the re-noising noise from torch's global generator
image = pipe("a photo of a cat", {args}).images[0]  # 2 network evaluations
image.save("sample.png")"""
    if lora:
        text += f"""

# or: the LoRA ({WEIGHTS_NAME}) on the original teacher
from diffusers import FlowMatchLCMScheduler

pipe = DiffusionPipeline.from_pretrained("{base_model}")
pipe.load_lora_weights("PATH_OR_REPO_ID")
pipe.scheduler = FlowMatchLCMScheduler.from_pretrained("PATH_OR_REPO_ID", subfolder="scheduler")
torch.manual_seed(0)
image = pipe("a photo of a cat", {args}).images[0]"""
    return text


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
