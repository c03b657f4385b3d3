"""The recipes' teachers as data: the published diffusers configs of their denoisers (built on the meta device they
cost nothing, and give the parameter counts and the activation shapes) and the parameter counts of their frozen
text encoders and VAEs, with the example inputs of one training forward at a given latent size.

Denoiser configs: the `unet/config.json` / `transformer/config.json` of each Hub repository (fields that equal the
diffusers defaults left out); built on meta their parameter counts are 35,746,307 (ddpm-cifar10-32), 859,520,964
(SD 1.5), 2,567,463,684 (SDXL, Playground v2.5), 749,826,464 (DiT-XL/2 in diffusers' layout: one time-and-class
embedding per block, 675M in the paper's shared layout), 2,028,328,000 (SD3 Medium), 11,901,408,320 (FLUX.1-dev),
1,604,462,752 (Sana 1.6B). Frozen components (text encoders + VAE, published model cards): SD 1.5 CLIP-L 123.1M + VAE
83.7M; SDXL CLIP-L 123.1M + OpenCLIP-bigG 694.7M + VAE 83.7M; DiT VAE 83.7M; SD3 CLIP-L 123.7M + CLIP-G 694.7M +
T5-XXL encoder 4,762.3M + VAE 83.8M; FLUX CLIP-L 123.1M + T5-XXL 4,762.3M + VAE 83.8M; Sana Gemma-2-2B 2,614M +
DC-AE 312M.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SD15_UNET = {"attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "in_channels": 4, "out_channels": 4,
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2,
             "sample_size": 64}  # fmt: skip
SDXL_UNET = {"addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
             "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "in_channels": 4,
             "out_channels": 4, "layers_per_block": 2, "projection_class_embeddings_input_dim": 2816,
             "sample_size": 128, "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True}  # fmt: skip
CIFAR10_UNET = {"block_out_channels": [128, 256, 256, 256], "in_channels": 3, "out_channels": 3,
                "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], "downsample_padding": 0,
                "flip_sin_to_cos": False, "freq_shift": 1, "layers_per_block": 2, "norm_eps": 1e-6,
                "sample_size": 32, "attention_head_dim": None}  # fmt: skip
DIT_XL_2 = {"activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72, "in_channels": 4,
            "norm_type": "ada_norm_zero", "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28,
            "out_channels": 8, "patch_size": 2, "sample_size": 32}  # fmt: skip
SD3_MEDIUM = {"attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
              "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
              "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "sample_size": 128}  # fmt: skip
FLUX_DEV = {"attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
            "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
            "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}  # fmt: skip
SANA_1600M = {"attention_bias": False, "attention_head_dim": 32, "caption_channels": 2304, "cross_attention_dim": 2240,
              "cross_attention_head_dim": 112, "in_channels": 32, "mlp_ratio": 2.5, "norm_elementwise_affine": False,
              "norm_eps": 1e-6, "num_attention_heads": 70, "num_cross_attention_heads": 20, "num_layers": 20,
              "out_channels": 32, "patch_size": 1, "sample_size": 32}  # fmt: skip


# --- one training forward's inputs per denoiser class: (batch B, latent height h, width w, dtype) -> kwargs -------


def unet2d_inputs(config: dict, B: int, h: int, w: int, dtype: torch.dtype) -> dict:
    return {"sample": torch.empty(B, config["in_channels"], h, w, dtype=dtype), "timestep": torch.empty(B)}


def unet_condition_inputs(config: dict, B: int, h: int, w: int, dtype: torch.dtype) -> dict:
    """77 text tokens; SDXL's pooled text embedding and size conditioning."""
    kwargs = {"sample": torch.empty(B, config["in_channels"], h, w, dtype=dtype), "timestep": torch.empty(B),
              "encoder_hidden_states": torch.empty(B, 77, config["cross_attention_dim"], dtype=dtype)}  # fmt: skip
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(B, pooled, dtype=dtype),
                                       "time_ids": torch.empty(B, 6, dtype=dtype)}  # fmt: skip
    return kwargs


def dit_inputs(config: dict, B: int, h: int, w: int, dtype: torch.dtype) -> dict:
    return {"hidden_states": torch.empty(B, config["in_channels"], h, w, dtype=dtype), "timestep": torch.empty(B),
            "class_labels": torch.zeros(B, dtype=torch.long)}  # fmt: skip


def sd3_inputs(config: dict, B: int, h: int, w: int, dtype: torch.dtype) -> dict:
    """77 CLIP + 256 T5 tokens (StableDiffusion3Pipeline's default max_sequence_length)."""
    return {"hidden_states": torch.empty(B, config["in_channels"], h, w, dtype=dtype), "timestep": torch.empty(B),
            "encoder_hidden_states": torch.empty(B, 333, config["joint_attention_dim"], dtype=dtype),
            "pooled_projections": torch.empty(B, config["pooled_projection_dim"], dtype=dtype)}  # fmt: skip


def flux_inputs(config: dict, B: int, h: int, w: int, dtype: torch.dtype) -> dict:
    """Latents packed 2x2 (h/2 * w/2 tokens of 64 channels), 512 T5 tokens (FluxPipeline's default)."""
    tokens = (h // 2) * (w // 2)
    return {"hidden_states": torch.empty(B, tokens, config["in_channels"], dtype=dtype), "timestep": torch.empty(B),
            "encoder_hidden_states": torch.empty(B, 512, config["joint_attention_dim"], dtype=dtype),
            "pooled_projections": torch.empty(B, config["pooled_projection_dim"], dtype=dtype),
            "img_ids": torch.empty(tokens, 3), "txt_ids": torch.empty(512, 3), "guidance": torch.empty(B)}  # fmt: skip


def sana_inputs(config: dict, B: int, h: int, w: int, dtype: torch.dtype) -> dict:
    """300 Gemma tokens (SanaPipeline's default max_sequence_length)."""
    return {"hidden_states": torch.empty(B, config["in_channels"], h, w, dtype=dtype), "timestep": torch.empty(B),
            "encoder_hidden_states": torch.empty(B, 300, config["caption_channels"], dtype=dtype)}  # fmt: skip


EXAMPLE_INPUTS: dict[str, Callable[..., dict]] = {
    "UNet2DModel": unet2d_inputs, "UNet2DConditionModel": unet_condition_inputs, "DiTTransformer2DModel": dit_inputs,
    "SD3Transformer2DModel": sd3_inputs, "FluxTransformer2DModel": flux_inputs, "SanaTransformer2DModel": sana_inputs,
}  # fmt: skip


@dataclass(frozen=True)
class Architecture:
    """A teacher's denoiser (diffusers class and config) and what else its pipeline holds frozen."""

    denoiser_class: str  # diffusers class name of the denoiser
    config: dict  # its published config
    frozen_params: int  # text encoders + VAE
    downsample: int  # pixels per latent pixel (VAE factor; 1 for pixel models)


TEACHERS: dict[str, Architecture] = {
    "google/ddpm-cifar10-32": Architecture("UNet2DModel", CIFAR10_UNET, 0, 1),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": Architecture("UNet2DConditionModel", SD15_UNET, 206_740_000, 8),
    "stabilityai/stable-diffusion-xl-base-1.0": Architecture("UNet2DConditionModel", SDXL_UNET, 901_460_000, 8),
    "playgroundai/playground-v2.5-1024px-aesthetic": Architecture("UNet2DConditionModel", SDXL_UNET, 901_460_000, 8),
    "facebook/DiT-XL-2-256": Architecture("DiTTransformer2DModel", DIT_XL_2, 83_650_000, 8),
    "stabilityai/stable-diffusion-3-medium-diffusers": Architecture("SD3Transformer2DModel", SD3_MEDIUM,
                                                                    5_664_500_000, 8),  # fmt: skip
    "black-forest-labs/FLUX.1-dev": Architecture("FluxTransformer2DModel", FLUX_DEV, 4_969_200_000, 8),
    "Efficient-Large-Model/Sana_1600M_1024px_diffusers": Architecture("SanaTransformer2DModel", SANA_1600M,
                                                                      2_926_000_000, 32),  # fmt: skip
}
