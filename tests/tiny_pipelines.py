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


# --- transformer and EDM families (DiT, SD3, FLUX, Sana, EDM) ----------------------------------------------------


def tiny_dit_pipeline(seed: int = 0, num_classes: int = 1000):
    """DiTPipeline: a 2-block DiT with learned variance (2C output channels) and the ImageNet label table
    (1000 classes + the null class 1000, which DiTPipeline hard-codes), on 4x16x16 latents."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=IMAGE_SIZE // 2, patch_size=2,
                                        num_embeds_ada_norm=num_classes, norm_num_groups=4).eval()  # fmt: skip
    scheduler = DDIMScheduler(clip_sample=False)  # DiT-XL-2: linear betas, eps-prediction
    return DiTPipeline(transformer=transformer, vae=tiny_vae(seed), scheduler=scheduler)


def tiny_t5_tokenizer():
    """T5 sentencepiece-style tokenizer over lowercase letters and digits (one piece per character)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in string.ascii_lowercase
                                                                 + string.digits + "\u2581"]  # fmt: skip
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_t5_encoder(d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tiny_t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                      num_heads=2, relative_attention_num_buckets=8)  # fmt: skip
    return T5EncoderModel(config).eval()


def tiny_sd3_pipeline(seed: int = 0):
    """StableDiffusion3Pipeline: a 2-block MMDiT (patch 2) on 4x16x16 latents, two CLIP encoders whose projections
    sum to pooled_projection_dim and whose states (16 + 16) fill joint_attention_dim, a tiny T5, a VAE with a
    shift factor, FlowMatchEulerDiscreteScheduler with shift 3 (SD3's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=16).eval()  # fmt: skip
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(seed, scaling_factor=0.6, shift_factor=0.1),
                                    text_encoder=tiny_clip_text_encoder(seed=seed, projection_dim=8),
                                    tokenizer=tiny_clip_tokenizer(),
                                    text_encoder_2=tiny_clip_text_encoder(seed=seed + 1, projection_dim=8),
                                    tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=tiny_t5_encoder(seed=seed),
                                    tokenizer_3=tiny_t5_tokenizer())  # fmt: skip


def tiny_flux_vae(seed: int = 0):
    """AutoencoderKL with four levels (downsampling 8, as FLUX's: the pipeline packs 2x2 latent patches, so image
    sizes must be multiples of 16), 4 latent channels, FLUX's shift/scale and no quant convs."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4, 8, 8, 8), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=0.6,
                         shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False).eval()  # fmt: skip


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """FluxPipeline: 1 double + 1 single block on packed 4x4x4 latents (16 channels after 2x2 packing), CLIP (its
    pooled output) + T5, dynamic shifting; guidance_embeds=True is the guidance-distilled "dev" layout."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4)).eval()  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_flux_vae(seed),
                        text_encoder=tiny_clip_text_encoder(seed=seed), tokenizer=tiny_clip_tokenizer(),
                        text_encoder_2=tiny_t5_encoder(seed=seed), tokenizer_2=tiny_t5_tokenizer())  # fmt: skip


def tiny_flux_schnell_pipeline(seed: int = 0):
    """FLUX without a guidance embedding (the schnell / base layout): read with true CFG."""
    return tiny_flux_pipeline(seed, guidance_embeds=False)


def tiny_gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({c: len(vocab) + i for i, c in enumerate(string.ascii_lowercase + string.digits + " :,.-'")})
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)  # as Gemma: every prompt starts with <bos>


def tiny_sana_pipeline(seed: int = 0, guidance_embeds: bool = False):
    """SanaPipeline: a 2-block linear-attention Sana transformer on 4x16x16 latents, a tiny Gemma 2 encoder, a
    2-level deep-compression autoencoder, and Sana's scheduler (DPM-Solver on flow sigmas, flow_shift 3)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=16, mlp_ratio=2.0,
                                         sample_size=IMAGE_SIZE // 2, patch_size=1,
                                         guidance_embeds=guidance_embeds).eval()  # fmt: skip
    tokenizer = tiny_gemma_tokenizer()
    encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                       max_position_embeddings=2048)).eval()  # fmt: skip
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
                        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16),
                        decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                        decoder_qkv_multiscales=((), ()), scaling_factor=0.5).eval()  # fmt: skip
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)  # fmt: skip


PLAYGROUND_LATENTS = {"latents_mean": [-1.6574, 1.886, -1.383, 2.5155], "latents_std": [8.4927, 5.9022, 6.5498, 5.2299]}


def tiny_edm_sdxl_pipeline(seed: int = 0, scheduler: str = "EDMDPMSolverMultistepScheduler"):
    """The Playground v2.5 layout: StableDiffusionXLPipeline with an EDM scheduler (sigma_data 0.5, sigma in
    [0.002, 80], EDM "epsilon" output scaling) and a VAE with per-channel latent statistics (Playground's)."""
    import diffusers

    pipe = tiny_sdxl_pipeline(seed)
    pipe.scheduler = getattr(diffusers, scheduler)(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
                                                   prediction_type="epsilon")  # fmt: skip
    pipe.vae = tiny_vae(seed, scaling_factor=0.5, **PLAYGROUND_LATENTS)
    return pipe


def tiny_edm_euler_sdxl_pipeline(seed: int = 0):
    return tiny_edm_sdxl_pipeline(seed, "EDMEulerScheduler")


TINY_PIPELINES.update({"dit": tiny_dit_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline,
                       "flux-schnell": tiny_flux_schnell_pipeline, "sana": tiny_sana_pipeline,
                       "edm": tiny_edm_sdxl_pipeline, "edm-euler": tiny_edm_euler_sdxl_pipeline})  # fmt: skip


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


def save_class_images(folder: Path, classes: int = 3, per_class: int = 3, size: int = IMAGE_SIZE,
                      seed: int = 0) -> Path:  # fmt: skip
    """An imagefolder with one subfolder of smooth random RGB images per class (labels 0..classes-1)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / f"class{c:02d}" / f"{i}.png")
    return folder
