"""Stable Diffusion teachers: SD 1.x / 2.x (`StableDiffusionPipeline`) and SDXL (`StableDiffusionXLPipeline`).

A `UNet2DConditionModel` on VAE latents (latent.py) with a DDPM-family schedule (vp.py), conditioned on CLIP text
states (SDXL: two encoders, plus pooled text and size/crop "time ids"). The teacher is read with classifier-free
guidance at per-sample scales s (guidance.py); the unconditional branch is the negative prompt, encoded by the
pipeline's own `encode_prompt` rules (the empty prompt; SDXL zeros it when `force_zeros_for_empty_prompt`).

Students: the full student is the teacher's UNet rebuilt with `time_cond_proj_dim` (diffusers' LCM guidance input)
whose projection starts at zero, so it equals the teacher at init; a LoRA student (lora.py) keeps the teacher's
architecture, so it cannot take s and distills CFG at the one scale `guidance.scale`.

Export: the stock pipeline class with a stock LCMScheduler (lcm.py), which reproduces the toolkit's 2-step sampler
bit for bit when called with the exported integer `timesteps` and `guidance_scale` (stock pipelines' call defaults,
50 steps at scale 7.5, cannot be changed; the call is in the model card and in `scm_call.json`). LoRA runs also
write the adapters for `load_lora_weights` on the original teacher.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import diffusers
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from torch import Tensor

from ..export.call import CALL_FILE
from ..export.card import write_model_card
from ..lora import WEIGHTS_NAME, add_lora, base_call, check_lora, has_lora, merged_copy, save_lora
from ..parameterization import Condition, NativeModel, Prediction, freeze
from ..student import set_dropout, student_prediction
from .base import ExportInfo, Teacher, component_class
from .guidance import GuidedModel, expand_condition, guidance_embedding, guidance_range, sample_guidance_scales
from .latent import LatentData, LatentSpace
from .lcm import consistency_timesteps, lcm_export_samples, lcm_scheduler
from .vp import scheduler_config, vp_prediction, vp_process

if TYPE_CHECKING:
    from ..config import DistillConfig, LoraConfig


def unet_call(network: torch.nn.Module, x: Tensor, time: Tensor, condition: Condition) -> Tensor:
    """Feeds a UNet2DConditionModel: text states, SDXL's added conditioning and, for students with a guidance
    input, the embedding of condition["guidance_scale"] as `timestep_cond` (what the stock pipelines pass)."""
    added = {"text_embeds": condition["text_embeds"], "time_ids": condition["time_ids"]} \
        if "text_embeds" in condition else None  # fmt: skip
    dim = network.config.time_cond_proj_dim
    timestep_cond = guidance_embedding(condition["guidance_scale"], dim).to(x.dtype) if dim else None
    return network(x, time, encoder_hidden_states=condition["encoder_hidden_states"], timestep_cond=timestep_cond,
                   added_cond_kwargs=added).sample  # fmt: skip


def unet_with_guidance_input(unet: UNet2DConditionModel, embedding_dim: int) -> UNet2DConditionModel:
    """The teacher's UNet with a guidance input (time_cond_proj_dim), its weights loaded and the new projection
    zero-initialised, so that the student starts equal to the teacher (Sec. 5.2)."""
    student = UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=embedding_dim)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise ValueError(f"the teacher's UNet cannot take a guidance input (missing {missing}, unexpected "
                         f"{unexpected}).")  # fmt: skip
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(device=unet.device, dtype=unet.dtype)


def half_precision_only(unet_folder: Path) -> str | None:
    """'fp16' when a component folder holds only fp16-variant weights, 'half' when its only weights are stored in
    16 bits, else None."""
    files = [f for f in unet_folder.iterdir() if f.suffix in (".safetensors", ".bin")]
    full = [f for f in files if len(f.name.split(".")) == 2]
    if not full:
        return "fp16" if any(".fp16." in f.name for f in files) else None
    tensors = [f for f in full if f.suffix == ".safetensors"]
    if len(tensors) == len(full):
        with safe_open(tensors[0], "pt") as f:
            first = next(iter(f.keys()), None)
            if first is not None and f.get_slice(first).get_dtype() in ("F16", "BF16"):
                return "half"
    return None


@contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading progress bars off while a teacher loads (the CLI prints one line)."""
    import transformers.utils.logging as transformers_logging
    from diffusers.utils import logging as diffusers_logging

    modules = [m for m in (diffusers_logging, transformers_logging) if m.is_progress_bar_enabled()]
    for module in modules:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module in modules:
            module.enable_progress_bar()


class StableDiffusionTeacher(Teacher):
    family = "sd"
    description = "StableDiffusionPipeline (SD 1.x / 2.x, epsilon or v_prediction), latent space, text + CFG"
    pipeline_name: ClassVar[str] = "StableDiffusionPipeline"
    load_options: ClassVar[dict] = {"safety_checker": None, "requires_safety_checker": False}  # loaded at export

    def __init__(self, pipe, source: str, folder: Path, sigma_d: float, variant: str | None = None):
        self.pipe, self.source, self.folder, self.variant = pipe, source, Path(folder), variant
        self.unet = freeze(pipe.unet)
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and name != "unet":
                freeze(component)
        self.space = LatentSpace(pipe.vae)
        self.latents = LatentData(self.space)
        self.scheduler_config = scheduler_config(pipe.scheduler)
        size = self.unet.config.sample_size
        self.resolution = tuple(s * self.space.downsampling for s in ((size, size) if isinstance(size, int) else size))
        # run settings: defaults until configure() reads the config
        self.scales, self.default_scale = (1.0, 2.0), 1.5  # training range of s, and the export's / grids' s
        self.negative_prompt, self.prompts, self.embedding_dim = "", (), 256
        self.lora: LoraConfig | None = None
        self.sigma_images, self.seed = 1024, 0
        self._negative: Condition | None = None  # the negative prompt's inputs, encoded once
        self.model = self._teacher_model(sigma_d)

    @classmethod
    def pipeline_class(cls) -> type:
        return getattr(diffusers, cls.pipeline_name)  # diffusers imports pipelines lazily

    def _teacher_model(self, sigma_d: float) -> GuidedModel:
        return GuidedModel(self.unet, vp_process(self.scheduler_config, sigma_d), vp_prediction(self.scheduler_config),
                           sigma_d, base_call(unet_call))  # fmt: skip

    @classmethod
    def matches(cls, model_index: dict) -> bool:
        return model_index.get("_class_name") == cls.pipeline_name and \
            component_class(model_index, "unet") == "UNet2DConditionModel"  # fmt: skip

    @classmethod
    def from_pretrained(cls, folder: Path, source: str, sigma_d: float, device: torch.device,
                        dtype: torch.dtype) -> StableDiffusionTeacher:  # fmt: skip
        if importlib.util.find_spec("transformers") is None:
            raise ValueError(f"teacher '{source}' is a {cls.pipeline_name}, which needs transformers: "
                             f"pip install 'scm-distill[text]'.")  # fmt: skip
        half = half_precision_only(Path(folder) / "unet")
        if half and device.type == "cpu":
            raise ValueError(f"teacher '{source}' has only fp16 weights, which are meant for GPUs (on the CPU the "
                             f"toolkit trains in float32); run on a GPU or give a checkpoint with float32 "
                             f"weights.")  # fmt: skip
        variant = "fp16" if half == "fp16" else None
        with quiet_loading():
            pipe = cls.pipeline_class().from_pretrained(folder, torch_dtype=dtype, variant=variant, **cls.load_options)
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise ValueError(f"teacher '{source}' already takes a guidance-scale input (a guidance-distilled UNet); "
                             f"distill the model it was distilled from.")  # fmt: skip
        return cls(pipe.to(device), source, folder, sigma_d, variant)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.unet.config.in_channels, *self.space.latent_size(self.resolution))

    @property
    def device(self) -> torch.device:
        return self.unet.device

    # --- configuration and data ----------------------------------------------------------------------------

    def configure(self, config: DistillConfig) -> None:
        """Guidance, LoRA and latent settings; LoRA students cannot take s, so they distill CFG at guidance.scale."""
        guidance, lora = config.guidance, config.lora
        self.scales = (guidance.scale, guidance.scale) if lora.rank else guidance_range(guidance.s_min, guidance.s_max)
        self.default_scale, self.negative_prompt = guidance.scale, guidance.negative_prompt
        self.prompts, self.embedding_dim, self.lora = tuple(guidance.prompts), guidance.embedding_dim, lora
        self.sigma_images, self._negative, self.seed = config.data.sigma_data_images, None, config.train.seed
        self.latents = LatentData(self.space, config.data.latent_cache)
        if lora.rank:
            check_lora(self.unet, lora.rank, lora.target_modules)

    def check_data(self, images) -> None:
        if not images.has_captions:
            raise ValueError(f"the teacher is text-conditioned but data '{images.name}' has no captions (an image "
                             f"folder needs a metadata.jsonl with a 'text' field).")  # fmt: skip
        self.space.check_images(images)

    def prepare(self, images) -> None:
        """Check the data, take its resolution, measure sigma_d on its latents and rebuild the TrigFlow reading."""
        self.check_data(images)
        self.resolution = tuple(images.resolution)
        if not self.prompts:
            self.prompts = tuple(images[i]["caption"] for i in range(min(len(images), 8)))
        self.model = self._teacher_model(self.latents.sigma_data(images, self.sigma_images))

    # --- conditions ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def text_condition(self, prompts: list[str]) -> Condition:
        """Network inputs for a list of prompts, as the pipeline computes them."""
        states, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return {"encoder_hidden_states": states}

    @torch.no_grad()
    def negative_condition(self) -> Condition:
        """Network inputs of CFG's unconditional branch (batch 1), by the pipeline's negative-prompt rules."""
        negative = [self.negative_prompt] if self.negative_prompt else None
        _, states = self.pipe.encode_prompt([""], self.device, 1, True, negative)
        return {"encoder_hidden_states": states}

    def condition(self, prompts: list[str], scales: Tensor | float) -> Condition:
        """A guided condition: text inputs, the negative branch and per-sample guidance scales [B]."""
        n = len(prompts)
        s = torch.full((n,), float(scales)) if not isinstance(scales, Tensor) else scales
        if self._negative is None:
            self._negative = self.negative_condition()
        return {**self.text_condition(prompts), "uncond": expand_condition(self._negative, n),
                "guidance_scale": s.to(self.device, torch.float32)}  # fmt: skip

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Condition]:
        x0 = self.latents.latents(batch["image"]).to(self.device, torch.float32)
        s = sample_guidance_scales(x0.shape[0], *self.scales, generator)
        return x0, self.condition(batch["caption"], s)

    def prompt_condition(self, prompts: list[str]) -> Condition:
        return self.condition(list(prompts), self.default_scale)

    def sample_condition(self, batch_size: int, generator: torch.Generator) -> Condition:
        pool = self.prompts or ("",)
        return self.prompt_condition([pool[i % len(pool)] for i in range(batch_size)])

    def decode(self, x0: Tensor) -> Tensor:
        return self.space.decode(x0)

    # --- students and sampling -----------------------------------------------------------------------------

    def student_model(self, prediction: Prediction | None, dropout: float) -> NativeModel:
        """Full: the UNet with a zero-initialised guidance input. LoRA: the teacher's own UNet with adapters."""
        lora = self.lora
        if lora is not None and lora.rank:
            network = add_lora(self.unet, lora.rank, lora.alpha, lora.target_modules, self.seed)  # the teacher's own
        else:
            network = unet_with_guidance_input(self.unet, self.embedding_dim).train().requires_grad_(True)
            set_dropout(network, dropout)
        teacher = self.model
        return NativeModel(network, teacher.process, prediction or student_prediction(teacher), teacher.sigma_d,
                           unet_call)  # fmt: skip

    def consistency_samples(self, model: NativeModel, shape: tuple[int, ...], num_steps: int, t_max: float,
                            t_mid: float, generator, condition: Condition | None = None,
                            device=None) -> Tensor:  # fmt: skip
        """The export's sampler (lcm.py): the sCM times snapped to integer timesteps, noise in the latent space."""
        return lcm_export_samples(model, self.scheduler_config, shape, num_steps, t_max, t_mid, generator, condition,
                                  device or self.device)  # fmt: skip

    # --- export --------------------------------------------------------------------------------------------

    def call_kwargs(self, info: ExportInfo, guided: bool) -> dict:
        """Keyword arguments of the exact 2-step call (guidance_scale 1 = no CFG for students without s input)."""
        timesteps = consistency_timesteps(self.model.process, 2, info.t_max, info.t_mid)
        kwargs = {"timesteps": timesteps, "guidance_scale": self.default_scale if guided else 1.0}
        size = self.unet.config.sample_size
        default = tuple(s * self.space.downsampling for s in ((size, size) if isinstance(size, int) else size))
        if tuple(self.resolution) != default:  # the pipeline's default size is the UNet's sample_size in pixels
            kwargs.update(height=self.resolution[0], width=self.resolution[1])
        return kwargs

    def export(self, network: torch.nn.Module, folder: Path, info: ExportInfo) -> None:
        if info.prediction not in ("epsilon", "v_prediction", "sample"):
            raise NotImplementedError(f"LCMScheduler cannot read a {info.prediction} student.")
        lora = has_lora(network)
        unet = merged_copy(network) if lora else network
        components = {k: v for k, v in self.pipe.components.items() if v is not None and k not in ("unet", "scheduler")}
        scheduler = lcm_scheduler(self.scheduler_config, info.prediction)
        with quiet_loading():  # components the teacher did not load for training (a safety checker) come from disk
            pipe = self.pipeline_class().from_pretrained(self.folder, **components, unet=unet, scheduler=scheduler,
                                                         variant=self.variant)  # fmt: skip
            pipe.save_pretrained(folder, safe_serialization=True)
        index = json.loads((folder / "model_index.json").read_text())
        index.pop("_name_or_path", None)  # the teacher's local path is no part of the export
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        call = self.call_kwargs(info, guided=unet.config.time_cond_proj_dim is not None)
        one_step = {**call, "timesteps": consistency_timesteps(self.model.process, 1, info.t_max, info.t_mid)}
        (folder / CALL_FILE).write_text(json.dumps({"2_steps": call, "1_step": one_step}, indent=2) + "\n")
        if lora:
            save_lora(network, folder, self.pipeline_class())
        facts = {**info.card_facts, "sigma_data (measured on the latents)": f"{self.model.sigma_d:.4f}",
                 "timesteps (2 steps)": call["timesteps"], "guidance": self._guidance_fact(call)}  # fmt: skip
        t_max, t_mid = self.model.process.t_at(torch.tensor(call["timesteps"], dtype=torch.float64)).tolist()
        info = dataclasses.replace(info, sigma_data=round(self.model.sigma_d, 6), card_facts=facts, t_max=t_max,
                                   t_mid=t_mid)  # the card states the snapped times  # fmt: skip
        write_model_card(folder, info, usage=usage(self.pipeline_name, call, lora, info.base_model),
                         pipeline_tag="text-to-image")  # fmt: skip

    def _guidance_fact(self, call: dict) -> str:
        if call["guidance_scale"] == 1.0 and self.lora is not None and self.lora.rank:
            return f"CFG at s = {self.default_scale} distilled into the LoRA student (call with guidance_scale=1)"
        return f"student input, trained on s ~ U[{self.scales[0]}, {self.scales[1]}], default {self.default_scale}"


class StableDiffusionXLTeacher(StableDiffusionTeacher):
    family = "sdxl"
    description = "StableDiffusionXLPipeline (two text encoders, added text/time conditioning), latent space, CFG"
    pipeline_name: ClassVar[str] = "StableDiffusionXLPipeline"
    load_options: ClassVar[dict] = {}

    def _time_ids(self, n: int, dtype: torch.dtype) -> Tensor:
        """SDXL's micro-conditioning (original size, crop top-left, target size) = the training resolution, no
        crop: what the pipeline passes when called at that height and width."""
        h, w = self.resolution
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype).to(self.device).repeat(n, 1)

    @torch.no_grad()
    def text_condition(self, prompts: list[str]) -> Condition:
        states, _, pooled, _ = self.pipe.encode_prompt(list(prompts), device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)  # fmt: skip
        return {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": self._time_ids(len(prompts),
                                                                                                  states.dtype)}

    @torch.no_grad()
    def negative_condition(self) -> Condition:
        negative = [self.negative_prompt] if self.negative_prompt else None
        _, states, _, pooled = self.pipe.encode_prompt([""], device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True, negative_prompt=negative)
        return {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": self._time_ids(1, states.dtype)}


def _call_text(call: dict) -> str:
    args = ", ".join(f"{key}={value!r}" for key, value in call.items())
    return f'image = pipe("a photo of a cat", {args},\n             ' \
           f'generator=torch.Generator().manual_seed(0)).images[0]  # {len(call["timesteps"])} network evaluations'


def usage(pipeline_name: str, call: dict, lora: bool, base_model: str) -> str:
    """The model card's exact calls: the exported pipeline, and (LoRA runs) the LoRA on the original teacher."""
    text = f"""import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("PATH_OR_REPO_ID")  # {pipeline_name} + LCMScheduler
{_call_text(call)}
image.save("sample.png")"""
    if lora:
        text += f"""

# or: the LoRA ({WEIGHTS_NAME}) on the original teacher
from diffusers import LCMScheduler

pipe = DiffusionPipeline.from_pretrained("{base_model}")
pipe.load_lora_weights("PATH_OR_REPO_ID")
pipe.scheduler = LCMScheduler.from_pretrained("PATH_OR_REPO_ID", subfolder="scheduler")
{_call_text(call)}"""
    return text
