"""Tiny random-config pipelines of every latent family, built offline inside the tests (no downloads).

Each builder returns an in-memory diffusers pipeline with 32x32 images (ECOSYSTEM.md, "Tiny pipelines of every
family"); `save_tiny(name, folder, **options)` writes one through the `TINY_PIPELINES` registry. The shared
parts (a character-level CLIP tokenizer, small CLIP text encoders, a 2-level VAE) are the pieces the later
families (DiT, SD3, FLUX, Sana) reuse; add their builders to the registry.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 32  # pixels; the VAE below halves it once (latents 16x16)
MAX_TOKENS = 16  # tokenizer model_max_length and the text encoders' positions
CAPTIONS = ("a red square", "a blue circle", "a green line", "two dots", "a big x", "noise", "a cat", "stripes")


def tiny_clip_tokenizer():
    """CLIP BPE tokenizer over lowercase letters and digits (no merges: one token per character)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits:
        vocab[char] = len(vocab)
        vocab[f"{char}</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def tiny_clip_text_encoder(hidden: int = 16, projection_dim: int | None = None, seed: int = 0):
    """CLIPTextModel (or CLIPTextModelWithProjection when projection_dim is given) over the tiny vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vocab_size = len(tiny_clip_tokenizer())
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            projection_dim=projection_dim or hidden)  # fmt: skip
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval()


def tiny_vae(seed: int = 0, latent_channels: int = 4, scaling_factor: float = 0.5, **config):
    """AutoencoderKL with two levels (downsampling factor 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=IMAGE_SIZE,
                         scaling_factor=scaling_factor, **config).eval()  # fmt: skip


def tiny_sd_unet(cross_attention_dim: int = 16, seed: int = 0, **config):
    """UNet2DConditionModel with one cross-attention level (latents 4x16x16)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                cross_attention_dim=cross_attention_dim, attention_head_dim=4,
                                **config).eval()  # fmt: skip


def tiny_sd_pipeline(prediction: str = "epsilon", seed: int = 0):
    """StableDiffusionPipeline (SD 1.x layout; v_prediction gives the SD 2.x-v layout) without safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)  # fmt: skip
    return StableDiffusionPipeline(vae=tiny_vae(seed), text_encoder=tiny_clip_text_encoder(seed=seed),
                                   tokenizer=tiny_clip_tokenizer(), unet=tiny_sd_unet(seed=seed), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip


def tiny_sdxl_pipeline(seed: int = 0):
    """StableDiffusionXLPipeline: two CLIP encoders (the second with a projection), text_time added conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    time_dim, projection = 4, 8  # projection_class_embeddings_input_dim = 6 time ids x time_dim + pooled text
    unet = tiny_sd_unet(cross_attention_dim=32, seed=seed, addition_embed_type="text_time",
                        addition_time_embed_dim=time_dim, use_linear_projection=True,
                        projection_class_embeddings_input_dim=6 * time_dim + projection)  # fmt: skip
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")  # fmt: skip
    return StableDiffusionXLPipeline(vae=tiny_vae(seed, scaling_factor=0.6),
                                     text_encoder=tiny_clip_text_encoder(seed=seed),
                                     text_encoder_2=tiny_clip_text_encoder(seed=seed + 1, projection_dim=projection),
                                     tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(), unet=unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)  # fmt: skip


def tiny_sd_v_pipeline(seed: int = 0):
    """SD 2.x-v layout: v_prediction."""
    return tiny_sd_pipeline("v_prediction", seed)


TINY_PIPELINES: dict[str, Callable] = {"sd": tiny_sd_pipeline, "sd-v": tiny_sd_v_pipeline, "sdxl": tiny_sdxl_pipeline}


def save_tiny(name: str, folder: Path, **options) -> Path:
    """Build the tiny pipeline `name` of TINY_PIPELINES and save it (safetensors) to `folder`."""
    TINY_PIPELINES[name](**options).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def save_captioned_images(folder: Path, n: int = 8, size: int = IMAGE_SIZE, captions: bool = True,
                          seed: int = 0) -> Path:  # fmt: skip
    """An imagefolder of n smooth random RGB images, with a metadata.jsonl 'text' caption each (if `captions`)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": CAPTIONS[i % len(CAPTIONS)]}))
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
