"""Shared plumbing of latent teachers read with classifier-free guidance (DiT, SD3, FLUX, Sana), and the
zero-initialised guidance-scale input for networks that have none.

A `GuidedLatentTeacher` reads the run's guidance and latent settings, measures sigma_d on the training latents
(latent.py) and rebuilds its TrigFlow reading with it. A `GuidedTransformer` is a student network: the teacher's
transformer plus `SCMGuidanceEmbedding` (the exported component file, export/templates/scm_guidance.py), whose
zero-initialised output is added to the transformer's time embedding (arXiv 2410.11081v2 Sec. 5.2, App. G.2).
"""

from __future__ import annotations

import copy
import shutil
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..export.templates.scm_guidance import SCMGuidanceEmbedding
from ..parameterization import Condition, NativeModel
from ..student import set_dropout
from .base import Teacher
from .guidance import guidance_range
from .latent import LatentData, LatentSpace

if TYPE_CHECKING:
    from ..config import DistillConfig, LoraConfig

GUIDANCE_FILE = Path(__file__).resolve().parent.parent / "export" / "templates" / "scm_guidance.py"
GUIDANCE_COMPONENT = "guidance_embedder"  # subfolder and model_index key of the exported guidance input


class GuidedTransformer(nn.Module):
    """A transformer with a guidance-scale input: forward(*args, guidance_scale=s [B], **kwargs) runs the
    transformer with the embedding of s added to its time embedding(s)."""

    def __init__(self, transformer: nn.Module, guidance_embedder: SCMGuidanceEmbedding):
        super().__init__()
        self.transformer = transformer
        self.guidance_embedder = guidance_embedder

    @property
    def config(self):
        return self.transformer.config

    def forward(self, *args, guidance_scale: Tensor, **kwargs):
        with self.guidance_embedder.added_to(self.transformer, guidance_scale):
            return self.transformer(*args, **kwargs)

    def save_components(self, folder: Path) -> None:
        """transformer/ and guidance_embedder/."""
        self.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
        self.save_guidance_input(folder)

    def save_guidance_input(self, folder: Path) -> None:
        """guidance_embedder/ with its code file (diffusers loads it with trust_remote_code=True)."""
        self.guidance_embedder.save_pretrained(folder / GUIDANCE_COMPONENT, safe_serialization=True)
        shutil.copyfile(GUIDANCE_FILE, folder / GUIDANCE_COMPONENT / GUIDANCE_FILE.name)


def with_guidance_input(transformer: nn.Module, width: int, targets: list[str], embedding_dim: int,
                        dropout: float) -> GuidedTransformer:  # fmt: skip
    """A trainable copy of `transformer` with a zero-initialised guidance input (sinusoidal features of width
    `embedding_dim` -> linear -> `width`) added to the outputs of its modules `targets`."""
    network = copy.deepcopy(transformer).train().requires_grad_(True)
    set_dropout(network, dropout)
    embedder = SCMGuidanceEmbedding(out_dim=width, in_dim=embedding_dim, target_modules=tuple(targets))
    return GuidedTransformer(network, placed_like(embedder, network)).train()


def placed_like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """`module` on the device (and, if it differs from float32, in the dtype) of `reference`'s parameters
    (diffusers warns about casting a float32 model with `to`)."""
    parameter = next(reference.parameters())
    if parameter.dtype == torch.float32:
        return module.to(parameter.device)
    return module.to(parameter.device, parameter.dtype)


class GuidedLatentTeacher(Teacher):
    """Run settings and sigma_d measurement shared by the guided latent families; subclasses set `space`, call
    `reset_run_settings()` in their constructor and implement `_teacher_model(sigma_d)`."""

    space: LatentSpace
    resolution: tuple[int, int]
    lora_supported: bool = False

    def reset_run_settings(self) -> None:
        """Defaults until configure() reads the config."""
        self.latents = LatentData(self.space)
        self.scales, self.default_scale = (1.0, 2.0), 1.5  # training range of s, and the export's / grids' s
        self.negative_prompt, self.prompts, self.embedding_dim = "", (), 256
        self.lora: LoraConfig | None = None
        self.sigma_images, self.seed = 1024, 0
        self._negative: Condition | None = None  # CFG's unconditional inputs, computed once

    @abstractmethod
    def _teacher_model(self, sigma_d: float) -> NativeModel:
        """The teacher read in TrigFlow with data standard deviation sigma_d."""

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None and self.lora.rank > 0

    def configure(self, config: DistillConfig) -> None:
        """Guidance and latent settings; LoRA only where the family supports it."""
        if config.lora.rank and not self.lora_supported:
            super().configure(config)  # the one-sentence "not supported" error
        guidance = config.guidance
        self.scales = guidance_range(guidance.s_min, guidance.s_max)
        self.default_scale, self.negative_prompt = guidance.scale, guidance.negative_prompt
        self.prompts, self.embedding_dim, self.lora = tuple(guidance.prompts), guidance.embedding_dim, config.lora
        self.sigma_images, self._negative, self.seed = config.data.sigma_data_images, None, config.train.seed
        self.latents = LatentData(self.space, config.data.latent_cache)

    def prepare(self, images) -> None:
        """Check the data, take its resolution, measure sigma_d on its latents and rebuild the TrigFlow reading."""
        self.check_data(images)
        self.resolution = tuple(images.resolution)
        self.model = self._teacher_model(self.latents.sigma_data(images, self.sigma_images))

    def encode_batch(self, batch: dict, device: torch.device) -> Tensor:
        """The latents x0 of a data batch, in float32 on `device`."""
        return self.latents.latents(batch["image"]).to(device, torch.float32)

    def decode(self, x0: Tensor) -> Tensor:
        return self.space.decode(x0)


def rebuilt_with_guidance_embedding(transformer: nn.Module, embedding: str, weights: dict | None = None) -> nn.Module:
    """`transformer` rebuilt from its config with `guidance_embeds=True` and its weights (`weights`, if the new
    config renames some), the new `{embedding}.guidance_embedder` the only missing keys; the embedder's last layer is
    zeroed, so its output is exactly 0 and the student equals the teacher at init (FLUX, Sana)."""
    student = type(transformer).from_config(transformer.config, guidance_embeds=True)
    missing, unexpected = student.load_state_dict(weights or transformer.state_dict(), strict=False)
    if unexpected or not all(key.startswith(f"{embedding}.guidance_embedder.") for key in missing):
        raise ValueError(f"the {type(transformer).__name__} cannot take a guidance embedding (missing {missing}, "
                         f"unexpected {unexpected}).")  # fmt: skip
    last = student.get_submodule(f"{embedding}.guidance_embedder.linear_2")
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return placed_like(student, transformer)
