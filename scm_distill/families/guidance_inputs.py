"""How a student takes the guidance scale s (arXiv 2410.11081v2 Sec. 5.2, App. G.2): the parts a family picks from.

- `unet_with_guidance_input`: a UNet2DConditionModel rebuilt with `time_cond_proj_dim`, diffusers' LCM guidance
  input, which stock SD / SDXL pipelines feed from their `guidance_scale` (SD, SDXL, EDM).
- `GuidedTransformer` / `with_guidance_input`: a transformer plus `SCMGuidanceEmbedding` (the exported component
  file export/templates/scm_guidance.py) whose output is added to its time embedding(s) (DiT, SD3, Sana);
  `AddedGuidanceInput`, the teacher methods SD3 and Sana share for it.
- `rebuilt_with_guidance_embedding`: a transformer rebuilt with its own `guidance_embeds` input, which the stock
  pipeline feeds (FLUX).
Every new input starts at exactly zero, so the student starts equal to the teacher. A LoRA student keeps the
teacher's architecture, cannot take s, and distills CFG at one scale; its export carries the same input at zero
(`zero_guidance_input`), so the stock or exported call runs no CFG branch and ignores the scale.
"""

from __future__ import annotations

import copy

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from ..errors import UserError
from ..export.templates.scm_guidance import SCMGuidanceEmbedding
from ..student import set_dropout


def unet_with_guidance_input(unet: UNet2DConditionModel, embedding_dim: int) -> UNet2DConditionModel:
    """The UNet with a guidance input (time_cond_proj_dim), its weights loaded, the new projection zero."""
    student = UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=embedding_dim)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise UserError(f"the teacher's UNet cannot take a guidance input (missing {missing}, unexpected "
                         f"{unexpected}).")  # fmt: skip
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(device=unet.device, dtype=unet.dtype)


class GuidedTransformer(nn.Module):
    """A transformer with a guidance-scale input: forward(*args, guidance=s [B], **kwargs) runs the transformer with
    the embedding of s added to its time embedding(s)."""

    def __init__(self, transformer: nn.Module, guidance_embedder: SCMGuidanceEmbedding):
        super().__init__()
        self.transformer = transformer
        self.guidance_embedder = guidance_embedder

    @property
    def config(self):
        return self.transformer.config

    def forward(self, *args, guidance: Tensor, **kwargs):
        with self.guidance_embedder.added_to(self.transformer, guidance):
            return self.transformer(*args, **kwargs)


class AddedGuidanceInput:
    """Teacher methods for a transformer that has no guidance input (SD3, Sana): the student is the transformer plus
    a zero-initialised SCMGuidanceEmbedding on `embedding_targets`, and the export's pipeline subclass
    (`student_pipeline_class`) feeds it, its CFG branch off. A family states the class, the targets and the width
    of its time embedding."""

    student_pipeline_class: type
    embedding_targets: list[str]

    def embedding_width(self) -> int:
        raise NotImplementedError

    def embedder(self) -> SCMGuidanceEmbedding:
        return guidance_embedder(self.transformer, self.embedding_width(), self.embedding_targets, self.embedding_dim,
                                 self.default_scale, self.scales)  # fmt: skip

    def guided_network(self, dropout: float) -> GuidedTransformer:
        return with_guidance_input(self.transformer, self.embedder(), dropout)

    def zero_guidance_input(self, network: nn.Module) -> GuidedTransformer:
        return GuidedTransformer(network, self.embedder())

    def call_overrides(self, network: nn.Module) -> dict:
        return {}  # the pipeline's CFG branch is always off

    def pipeline_parts(self, network: nn.Module) -> tuple[type, dict]:
        if not isinstance(network, GuidedTransformer):  # an unmerged LoRA student: its input is zero anyway
            network = GuidedTransformer(network, self.embedder())
        return self.student_pipeline_class, {"transformer": network.transformer,
                                             "guidance_embedder": network.guidance_embedder}


def guidance_embedder(reference: nn.Module, width: int, targets: list[str], embedding_dim: int, default: float,
                      scales: tuple[float, float]) -> SCMGuidanceEmbedding:  # fmt: skip
    """A zero-initialised SCMGuidanceEmbedding placed like `reference`, recording the distilled default and range."""
    embedder = SCMGuidanceEmbedding(out_dim=width, in_dim=embedding_dim, target_modules=tuple(targets),
                                    default_scale=default, scale_range=tuple(scales))  # fmt: skip
    return placed_like(embedder, reference)


def with_guidance_input(transformer: nn.Module, embedder: SCMGuidanceEmbedding, dropout: float) -> GuidedTransformer:
    """A trainable copy of `transformer` with `embedder` as its guidance input."""
    network = copy.deepcopy(transformer).train().requires_grad_(True)
    set_dropout(network, dropout)
    return GuidedTransformer(network, embedder).train()


def placed_like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """`module` on the device (and, if it differs from float32, in the dtype) of `reference`'s parameters
    (diffusers warns about casting a float32 model with `to`)."""
    parameter = next(reference.parameters())
    if parameter.dtype == torch.float32:
        return module.to(parameter.device)
    return module.to(parameter.device, parameter.dtype)


def rebuilt_with_guidance_embedding(transformer: nn.Module, embedding: str, weights: dict | None = None) -> nn.Module:
    """`transformer` rebuilt from its config with `guidance_embeds=True` and its weights (`weights`, if the new
    config renames some), the new `{embedding}.guidance_embedder` the only missing keys; the embedder's last layer is
    zeroed, so its output is exactly 0 and the student equals the teacher at init."""
    student = type(transformer).from_config(transformer.config, guidance_embeds=True)
    missing, unexpected = student.load_state_dict(weights or transformer.state_dict(), strict=False)
    if unexpected or not all(key.startswith(f"{embedding}.guidance_embedder.") for key in missing):
        raise UserError(f"the {type(transformer).__name__} cannot take a guidance embedding (missing {missing}, "
                         f"unexpected {unexpected}).")  # fmt: skip
    last = student.get_submodule(f"{embedding}.guidance_embedder.linear_2")
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return placed_like(student, transformer)
