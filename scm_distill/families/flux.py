"""FLUX teachers (`FluxPipeline`): a flow-matching MMDiT on 2x2-packed VAE latents.

The consistency model works on the unpacked latents [B, C, h, w] (the VAE's space); the network call packs them
into tokens [B, hw/4, 4C] with their position ids as the pipeline does, and unpacks the velocity (a permutation,
exact). The network time is s itself: the pipeline feeds timestep / 1000 and the transformer scales by 1000 after
casting to the hidden states' dtype; under bf16 autocast that cast would quantize t (~0.004), so the call keeps the
hidden states entering the time embedding in float32.

Guidance: guidance-distilled checkpoints (FLUX.1-dev, `guidance_embeds`) take s through their guidance embedding
and are read without CFG; others (schnell, base models) are read with true CFG against the negative prompt and
the student is rebuilt with a guidance embedding whose last layer starts at zero (so it equals the teacher).

Export: stock FluxPipeline, which feeds `guidance_scale` (default 3.5, the distilled default) to the guidance
embedding and runs no CFG branch by default, with the flow scheduler of flow.py (FluxPipeline passes no generator
to its scheduler: the scheduler seeds its re-noising from each sample's starting noise, so `generator` fixes the
samples). A LoRA student of a teacher without guidance embedding distills CFG at one scale (no guidance input).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor

from ..errors import UserError
from ..parameterization import Condition
from .base import Inputs
from .flow import FlowTeacher
from .guidance_inputs import rebuilt_with_guidance_embedding

MAX_SEQUENCE_LENGTH = 512  # T5 tokens, FluxPipeline's default


# 2x2 patches of a latent [B, C, h, w] -> tokens [B, (h/2)(w/2), 4C] (FluxPipeline's packing).
def pack_latents(x: Tensor) -> Tensor:
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), 4 * C)


# Inverse of pack_latents for an h x w latent.
def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    B, _, D = tokens.shape
    return tokens.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, h, w)


# Position ids of the packed image tokens: (0, row, column) per token, [(h/2)(w/2), 3].
def image_ids(h: int, w: int, device, dtype) -> Tensor:
    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


@contextmanager
def float32_time(network: torch.nn.Module) -> Iterator[None]:
    """Under autocast, the x embedder's output (whose dtype FLUX casts the timestep and guidance to) in float32."""
    if not torch.is_autocast_enabled():
        yield
        return
    handle = network.x_embedder.register_forward_hook(lambda module, args, output: output.float())
    try:
        yield
    finally:
        handle.remove()


def flux_call(network: torch.nn.Module, x: Tensor, time: Tensor, condition: Condition) -> Tensor:
    """Feeds a FluxTransformer2DModel on packed tokens: time = s, the guidance scale where the model embeds it."""
    _, _, h, w = x.shape
    states = condition["encoder_hidden_states"]
    guidance = condition["guidance"] if network.config.guidance_embeds else None
    with float32_time(network):
        out = network(hidden_states=pack_latents(x), timestep=time, guidance=guidance,
                      pooled_projections=condition["pooled_projections"], encoder_hidden_states=states,
                      txt_ids=torch.zeros(states.shape[1], 3, device=x.device, dtype=states.dtype),
                      img_ids=image_ids(h, w, x.device, states.dtype), return_dict=False)[0]  # fmt: skip
    return unpack_latents(out, h, w)


def transformer_with_guidance_embedding(transformer: FluxTransformer2DModel) -> FluxTransformer2DModel:
    """The transformer rebuilt with `guidance_embeds`, its weights loaded, the new embedding's last layer zero (its
    output is then exactly 0, so the student equals the teacher at init)."""
    return rebuilt_with_guidance_embedding(transformer, "time_text_embed")


class FluxTeacher(FlowTeacher):
    family = "flux"
    description = "FluxPipeline (packed latents; guidance-distilled dev checkpoints or true CFG), text"
    pipeline_name = "FluxPipeline"
    network_call = staticmethod(flux_call)
    stock_guidance = 3.5  # FluxPipeline's default guidance_scale, fed to the guidance embedding

    def __init__(self, pipe, source: str, folder: Path, sigma_d: float):
        vae_channels, channels = pipe.vae.config.latent_channels, pipe.transformer.config.in_channels
        if channels != 4 * vae_channels:
            raise UserError(f"teacher '{source}' packs 2x2 latent patches into {channels} channels but its VAE has "
                             f"{vae_channels} latent channels (x4 = {4 * vae_channels}).")  # fmt: skip
        super().__init__(pipe, source, folder, sigma_d)

    def default_resolution(self) -> tuple[int, int]:
        return (1024, 1024)  # FluxPipeline's default size (its default_sample_size 128 x 8)

    def time_scale(self) -> float:
        return 1.0  # the transformer scales s by 1000 itself

    def image_tokens(self, h: int, w: int) -> int:
        return (h // 2) * (w // 2)

    @property
    def native_guidance(self) -> bool:
        return bool(self.transformer.config.get("guidance_embeds", False))

    def check_data(self, images) -> None:
        super().check_data(images)
        step = 2 * self.space.downsampling
        h, w = images.resolution
        if h % step or w % step:
            raise UserError(f"data '{images.name}' is {h}x{w} but FLUX packs 2x2 latent patches, so its sizes must "
                             f"be multiples of {step}; set data.resize_to.")  # fmt: skip

    @torch.no_grad()
    def encode(self, inputs: Inputs) -> Condition:
        states, pooled, _ = self.pipe.encode_prompt(prompt=list(inputs["prompt"]), prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=MAX_SEQUENCE_LENGTH)  # fmt: skip
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def encode_negative(self) -> Condition:
        return self.encode({"prompt": [self.negative_prompt]})

    def guided_network(self, dropout: float) -> FluxTransformer2DModel:
        if self.native_guidance:
            return copy.deepcopy(self.transformer).train().requires_grad_(True)
        return transformer_with_guidance_embedding(self.transformer).train().requires_grad_(True)

    def pipeline_parts(self, network: torch.nn.Module):
        return self.pipeline_class(), {"transformer": network}
