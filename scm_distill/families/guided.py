"""The shared plumbing of latent teachers read with classifier-free guidance (SD, SDXL, EDM, DiT, SD3, FLUX, Sana).

A `GuidedLatentTeacher` works on its VAE's latents (latent.py: sigma_d measured on the training latents, optional
latent cache), reads the run's guidance settings, and builds guided conditions (guidance.py): the network inputs of
the condition, `"guidance"` = the per-sample scale s [B] that the student's guidance input (and a guidance-distilled
teacher's own) reads, and, for teachers read with CFG, the unconditional branch under `"uncond"` and the CFG scale
under `"guidance_scale"`. Its students take s (guidance_inputs.py) or, as LoRA students, distill CFG at one scale.

A family subclass says what is particular to it: its pipeline and network call, how it encodes prompts or labels
(`encode` / `encode_negative`), the student's guidance input, the stock default guidance scale of its pipeline (the
distilled default must equal it where the export is a stock pipeline), and its student pipeline.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from ..errors import UserError
from ..guidance import expand_condition, guidance_range, sample_guidance_scales
from ..lora import add_lora, check_lora, has_lora, merged_copy
from ..parameterization import Condition, NativeModel, Prediction
from ..student import set_dropout, student_prediction
from .base import Inputs, Teacher
from .latent import LatentData, LatentSpace
from .prompt_cache import PromptCache

if TYPE_CHECKING:
    from ..config import DistillConfig, LoraConfig

OWN_PIPELINE_DEFAULT_SCALE = 1.5  # the default of exports whose pipeline is ours (paper: evaluate at 1.2-1.5)


class GuidedLatentTeacher(Teacher):
    """Subclasses set `space`, `resolution` and `denoiser` (the UNet or transformer), call `reset_run_settings()`,
    and implement `_teacher_model`, `encode`, `encode_negative` and `guided_network`."""

    pipeline_tag: ClassVar[str] = "text-to-image"
    inputs_kind: ClassVar[str] = "prompt"
    lora_supported: ClassVar[bool] = True
    stock_guidance: ClassVar[float | None] = None  # the stock pipeline's default guidance_scale when it feeds s

    space: LatentSpace
    resolution: tuple[int, int]
    denoiser: torch.nn.Module

    def reset_run_settings(self) -> None:
        """Defaults until configure() reads the config."""
        self.latents = LatentData(self.space)
        self.default_scale = self.stock_guidance or OWN_PIPELINE_DEFAULT_SCALE
        self.scales = (1.0, max(2.0, self.default_scale))  # training range of s
        self.negative_prompt, self.prompts, self.embedding_dim = "", (), 256
        self.lora: LoraConfig | None = None
        self.sigma_images, self.seed = 1024, 0
        self._negative: Condition | None = None  # CFG's unconditional inputs, computed once
        self._prompt_cache = PromptCache(lambda prompts: self.encode({"prompt": prompts}))

    @abstractmethod
    def _teacher_model(self, sigma_d: float) -> NativeModel:
        """The teacher read in TrigFlow with data standard deviation sigma_d."""

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def at_resolution(self, resolution: tuple[int, int]) -> None:
        """Sample at `resolution` (pixels) instead of the pipeline's default size, the reading rebuilt for it (FLUX's
        shift depends on the token count): evaluate samples the teacher at the export's size this way."""
        self.resolution = tuple(resolution)
        self.model = self._teacher_model(self.model.sigma_d)

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None and self.lora.rank > 0

    @property
    def native_guidance(self) -> bool:
        """A guidance-distilled teacher: it takes s itself and is read without CFG."""
        return False

    @property
    def fixed_scale(self) -> bool:
        """A LoRA student of a teacher read with CFG cannot take s: it distills CFG at the one default scale."""
        return self.uses_lora and not self.native_guidance

    # --- configuration and data ----------------------------------------------------------------------------

    def configure(self, config: DistillConfig) -> None:
        """Guidance, LoRA and latent settings (one-sentence errors before anything is written)."""
        if config.lora.rank and not self.lora_supported:
            super().configure(config)  # the one-sentence "not supported" error
        guidance, self.lora = config.guidance, config.lora
        if config.lora.rank:
            check_lora(self.denoiser, config.lora.rank, config.lora.target_modules)
        self.default_scale = self.distilled_default(guidance.scale)
        if self.fixed_scale:
            self.scales = (self.default_scale, self.default_scale)
        else:
            s_max = guidance.s_max if guidance.s_max is not None else max(2.0, self.default_scale)
            self.scales = guidance_range(guidance.s_min, s_max)
            if not self.scales[0] <= self.default_scale <= self.scales[1]:
                raise UserError(f"the export's default guidance scale {self.default_scale} lies outside the training "
                                 f"range [{self.scales[0]}, {self.scales[1]}]; set guidance.s_min / guidance.s_max "
                                 f"around it.")  # fmt: skip
        self.negative_prompt, self.prompts, self.embedding_dim = guidance.negative_prompt, tuple(guidance.prompts), \
            guidance.embedding_dim  # fmt: skip
        self.sigma_images, self._negative, self.seed = config.data.sigma_data_images, None, config.train.seed
        self.latents = LatentData(self.space, config.data.latent_cache)

    def distilled_default(self, requested: float | None) -> float:
        """The export's default guidance scale: the stock pipeline's own default where a stock pipeline feeds s
        (its call cannot change it), else guidance.scale or OWN_PIPELINE_DEFAULT_SCALE."""
        stock = self.stock_guidance if not self.fixed_scale else None
        if stock is not None and requested is not None and requested != stock:
            raise UserError(f"the export is a stock {self.pipeline_name}, whose call defaults to guidance_scale "
                             f"{stock}; leave guidance.scale unset (or {stock}) and distill a range containing "
                             f"it.")  # fmt: skip
        if stock is not None:
            return stock
        return requested if requested is not None else (self.stock_guidance or OWN_PIPELINE_DEFAULT_SCALE)

    def prepare(self, images) -> None:
        """Check the data, take its resolution, measure sigma_d on its latents and rebuild the TrigFlow reading."""
        self.check_data(images)
        self.resolution = tuple(images.resolution)
        self.model = self._teacher_model(self.latents.sigma_data(images, self.sigma_images))
        if not self.prompts and images.has_captions:
            self.prompts = tuple(images[i]["caption"] for i in range(min(len(images), 8)))

    def check_data(self, images) -> None:
        if not images.has_captions:
            raise UserError(f"the teacher is text-conditioned but data '{images.name}' has no captions (an image "
                             f"folder needs a metadata.jsonl with a 'text' field).")  # fmt: skip
        self.space.check_images(images)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.space.channels, *self.space.latent_size(self.resolution))

    def decode(self, x0: Tensor) -> Tensor:
        return self.space.decode(x0)

    # --- conditions ----------------------------------------------------------------------------------------

    @abstractmethod
    def encode(self, inputs: Inputs) -> Condition:
        """Network inputs for pipeline inputs (prompts or class labels), as the pipeline computes them."""

    @abstractmethod
    def encode_negative(self) -> Condition:
        """Network inputs of CFG's unconditional branch (batch 1), by the pipeline's own rules."""

    def encoded(self, inputs: Inputs) -> Condition:
        """encode(inputs); prompts through the run's PromptCache (each distinct prompt encoded once per
        resolution, which SDXL's time ids carry)."""
        if "prompt" not in inputs:
            return self.encode(inputs)
        return self._prompt_cache(inputs["prompt"], key=tuple(self.resolution))

    def guided(self, inputs: Inputs, scales: Tensor | float) -> Condition:
        """Network inputs, the scales s [B] as "guidance", and (teachers read with CFG) the "uncond" branch and the
        CFG scale "guidance_scale" (guidance.py)."""
        condition = self.encoded(inputs)
        n = next(v for v in condition.values() if isinstance(v, Tensor)).shape[0]
        s = (torch.full((n,), float(scales)) if not isinstance(scales, Tensor) else scales).to(self.device,
                                                                                                torch.float32)
        condition = {**condition, "guidance": s}
        if self.native_guidance:
            return condition
        if self._negative is None:
            self._negative = self.encode_negative()
        return {**condition, "uncond": {**expand_condition(self._negative, n), "guidance": s}, "guidance_scale": s}

    def batch_inputs(self, batch: dict) -> Inputs:
        return {"prompt": list(batch["caption"])}

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Condition]:
        x0 = self.latents.latents(batch["image"]).to(self.device, torch.float32)
        s = sample_guidance_scales(x0.shape[0], *self.scales, generator)
        return x0, self.guided(self.batch_inputs(batch), s)

    def sample_inputs(self, n: int, generator: torch.Generator) -> Inputs:
        pool = self.prompts or ("",)
        return {"prompt": [pool[i % len(pool)] for i in range(n)], **self.size_inputs()}

    @abstractmethod
    def default_resolution(self) -> tuple[int, int]:
        """The (height, width) the stock pipeline makes when called without a size."""

    def size_inputs(self) -> Inputs:
        if tuple(self.resolution) == tuple(self.default_resolution()):
            return {}
        return {"height": self.resolution[0], "width": self.resolution[1]}

    def condition_for(self, inputs: Inputs) -> Condition:
        return self.guided(inputs, self.default_scale)

    # --- students and exports --------------------------------------------------------------------------------

    @abstractmethod
    def guided_network(self, dropout: float) -> torch.nn.Module:
        """A trainable copy of the denoiser that takes condition["guidance"], starting equal to the teacher."""

    @abstractmethod
    def student_call(self):
        """The student's network call (the teacher's without `base_call`: a LoRA student runs its adapters)."""

    def student_model(self, prediction: Prediction | None, dropout: float) -> NativeModel:
        """Full: the denoiser with a guidance input. LoRA: the teacher's own denoiser with adapters."""
        if self.uses_lora:
            lora = self.lora
            network = add_lora(self.denoiser, lora.rank, lora.alpha, lora.target_modules, self.seed)
        else:
            network = self.guided_network(dropout)
            set_dropout(network, dropout)
        teacher = self.model
        return NativeModel(network, teacher.process, prediction or student_prediction(teacher), teacher.sigma_d,
                           self.student_call())  # fmt: skip

    def export_network(self, network: torch.nn.Module) -> torch.nn.Module:
        """LoRA students merged (W + (alpha / r) B A) and given the family's guidance input at zero."""
        if not has_lora(network):
            return network
        merged = merged_copy(network)
        return self.zero_guidance_input(merged) if self.fixed_scale else merged

    def zero_guidance_input(self, network: torch.nn.Module) -> torch.nn.Module:
        """The merged LoRA network with the family's guidance input at exactly zero (its export ignores the scale)."""
        return network

    def call_overrides(self, network: torch.nn.Module) -> dict:
        return {"guidance_scale": 1.0} if has_lora(network) and self.fixed_scale else {}

    def guidance_fields(self, takes_scale: bool) -> dict:
        """The description's guidance fields; `takes_scale`: the export's call feeds guidance_scale to the student."""
        return {"guidance_scale": self.default_scale if takes_scale else None,
                "guidance_range": self.scales if takes_scale else None, "guidance_note": self.guidance_note(),
                "cfg_scale": self.default_scale, "resolution": tuple(self.resolution)}

    def guidance_note(self) -> str:
        if self.fixed_scale:
            return f"CFG at s = {self.default_scale} distilled into the weights (the call's guidance_scale is ignored)"
        where = "the teacher's guidance embedding" if self.native_guidance else "a student input (zero-initialised)"
        return (f"{where}, trained on s in [{self.scales[0]}, {self.scales[1]}]; `guidance_scale` defaults to "
                f"{self.default_scale}")  # fmt: skip
