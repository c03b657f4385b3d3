"""UNet2DConditionModel families: SD 1.x (eps, PNDM), SDXL (two encoders, added time ids, eps, Euler) and EDM
(the SDXL layout with EDMEulerScheduler, Playground v2.5 style).

SD 1.x and SDXL train eps on SD's scaled_linear schedule (beta 0.00085..0.012, 1000 steps) with uniform integer
timesteps (DDPM L_simple). EDM trains the preconditioned denoiser D with EDM's loss weighting (objectives.py) and
the stock EDMEulerScheduler's own c_in / c_noise / c_skip / c_out, so the UNet sees c_noise = log(sigma) / 4 as its
timestep, as in the pipeline. SDXL and EDM drop the text to zeros (SDXL's force_zeros_for_empty_prompt, which is
what the pipeline feeds as the unconditional branch); SD drops it to the empty prompt's states.
"""

from __future__ import annotations

import diffusers
import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from . import objectives as obj
from .base import FamilySize, LatentFamily, Table, channel_statistics, scale_only
from .data import CAPTIONS, IMAGE_SIZE
from .text import EncoderSize, clip_encoder, clip_tokenizer
from .training import TrainSettings

# Stable Diffusion 1.x's training schedule (its scheduler_config.json), shared by SDXL.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SD_TEXT = EncoderSize(hidden=64)
SDXL_TEXT, SDXL_TEXT_2 = EncoderSize(hidden=32), EncoderSize(hidden=64, projection=64)
SDXL_TIME_DIM = 8  # addition_time_embed_dim (SDXL: 256)
TIME_IDS = [IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]  # original size, crop top-left, target size
EDM_SIGMA_DATA = 0.5  # Playground v2.5's EDM sigma_data (the latents are scaled to std 0.5)

UNET_SIZES = {  # cpu: ~0.4 CPU-s per step on one thread (3.3M parameters), 5,000 steps ~ 35 CPU-min
    "cpu": FamilySize(model={"block_out_channels": (48, 96, 96), "layers_per_block": 1, "attention_head_dim": 4,
                             "norm_num_groups": 16},
                      train=TrainSettings(steps=5000, batch_size=32, lr=1e-3), guidance_scale=2.0),
    "toy": FamilySize(model={"block_out_channels": (8, 16, 16), "layers_per_block": 1, "attention_head_dim": 2,
                             "norm_num_groups": 4},
                      train=TrainSettings(steps=3, batch_size=4, lr=1e-3, log_every=1), guidance_scale=2.0),
}  # fmt: skip


def sd_unet(model: dict, channels: int, cross_attention_dim: int, seed: int, layout: str,
            **extra) -> UNet2DConditionModel:  # fmt: skip
    """UNet2DConditionModel on channels x 8 x 8 latents; "sd": cross-attention at the two finest levels (SD 1.x
    places it at every level but the coarsest), "sdxl": at the two coarsest (SDXL's first level has none)."""
    torch.manual_seed(seed)
    if layout == "sd":
        down = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
        up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    else:
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    config = {"norm_num_groups": 32, **model}
    return UNet2DConditionModel(sample_size=IMAGE_SIZE // 4, in_channels=channels, out_channels=channels,
                                down_block_types=down, up_block_types=up, cross_attention_dim=cross_attention_dim,
                                **config, **extra)  # fmt: skip


def sd_call(net: UNet2DConditionModel, x: Tensor, timestep: Tensor, condition: dict) -> Tensor:
    """The UNet as the SD / SDXL pipelines call it (SDXL's added text_embeds and time_ids when present)."""
    added = {k: condition[k] for k in ("text_embeds", "time_ids")} if "text_embeds" in condition else None
    return net(x, timestep, encoder_hidden_states=condition["encoder_hidden_states"],
               added_cond_kwargs=added).sample  # fmt: skip


class SDFamily(LatentFamily):
    """StableDiffusionPipeline, SD 1.x layout: one CLIP encoder, eps on scaled_linear, PNDMScheduler (50 steps)."""

    name, default_steps, denoiser_name, sizes = "sd", 50, "unet", UNET_SIZES

    def __init__(self):
        self.alphas_cumprod = diffusers.DDPMScheduler(**SD_SCHEDULE).alphas_cumprod

    def latent_config(self, stats: dict) -> dict:
        return scale_only(stats)

    def build_pipeline(self, vae, size: FamilySize, seed: int):
        scheduler = diffusers.PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1,
                                            set_alpha_to_one=False)  # SD 1.5's scheduler_config.json  # fmt: skip
        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=clip_encoder(SD_TEXT, seed + 1), tokenizer=clip_tokenizer(),
            unet=sd_unet(size.model, vae.config.latent_channels, SD_TEXT.hidden, seed, "sd"), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip

    @torch.no_grad()
    def condition_table(self, pipe) -> Table:
        states, empty = pipe.encode_prompt(list(CAPTIONS), "cpu", 1, True, None)
        return {"encoder_hidden_states": torch.cat([states, empty[:1]])}

    def loss(self, net, x0: Tensor, condition: dict, generator: torch.Generator) -> Tensor:
        tau = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        x_t = obj.vp_noised(x0, eps, self.alphas_cumprod[tau])
        return obj.per_sample_mse(sd_call(net, x_t, tau, condition), eps)

    def call_inputs(self, labels: list[int], guidance_scale: float) -> dict:
        return {"prompt": [CAPTIONS[label] for label in labels], "guidance_scale": guidance_scale}


class SDXLFamily(SDFamily):
    """StableDiffusionXLPipeline: two CLIP encoders (penultimate states concatenated, pooled text of the second),
    added time ids, eps on scaled_linear, EulerDiscreteScheduler (50 steps), zeros as the unconditional input."""

    name = "sdxl"

    def build_pipeline(self, vae, size: FamilySize, seed: int):
        scheduler = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading",
                                                     interpolation_type="linear", use_karras_sigmas=False,
                                                     prediction_type="epsilon")  # SDXL base 1.0's  # fmt: skip
        return self.sdxl_pipeline(vae, size, seed, scheduler)

    def sdxl_pipeline(self, vae, size: FamilySize, seed: int, scheduler):
        extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": SDXL_TIME_DIM,
                 "projection_class_embeddings_input_dim": len(TIME_IDS) * SDXL_TIME_DIM + SDXL_TEXT_2.projection,
                 "use_linear_projection": True}  # fmt: skip
        unet = sd_unet(size.model, vae.config.latent_channels, SDXL_TEXT.hidden + SDXL_TEXT_2.hidden, seed, "sdxl",
                       **extra)
        return diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=clip_encoder(SDXL_TEXT, seed + 1), text_encoder_2=clip_encoder(SDXL_TEXT_2, seed + 2),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=True, add_watermarker=False)  # fmt: skip

    @torch.no_grad()
    def condition_table(self, pipe) -> Table:
        states, zeros, pooled, zeros_pooled = pipe.encode_prompt(list(CAPTIONS), device="cpu",
                                                                 do_classifier_free_guidance=True)  # fmt: skip
        time_ids = torch.tensor([TIME_IDS], dtype=states.dtype).repeat(len(CAPTIONS) + 1, 1)
        return {"encoder_hidden_states": torch.cat([states, zeros[:1]]),
                "text_embeds": torch.cat([pooled, zeros_pooled[:1]]), "time_ids": time_ids}  # fmt: skip


class EDMFamily(SDXLFamily):
    """The Playground v2.5 layout: SDXL's pipeline and UNet with EDMEulerScheduler (sigma 0.002..80, sigma_data
    0.5, EDM "epsilon" output scaling), per-channel latent statistics, EDM's noise distribution and weighting."""

    name, vae_kind = "edm", "kl4"  # SDXL's pipeline reads 4 latent channels (latents_mean.view(1, 4, 1, 1))

    def __init__(self):
        self.scheduler = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=EDM_SIGMA_DATA,
                                                     num_train_timesteps=1000, prediction_type="epsilon")  # fmt: skip

    def latent_config(self, stats: dict) -> dict:
        return channel_statistics(stats, scaling_factor=EDM_SIGMA_DATA)

    def build_pipeline(self, vae, size: FamilySize, seed: int):
        return self.sdxl_pipeline(vae, size, seed, diffusers.EDMEulerScheduler.from_config(self.scheduler.config))

    def loss(self, net, x0: Tensor, condition: dict, generator: torch.Generator) -> Tensor:
        sigma = obj.edm_sigmas(x0.shape[0], generator, **EDMFamily.noise_distribution)
        x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=generator)
        s = sigma.view(-1, 1, 1, 1)
        c_noise = self.scheduler.precondition_noise(sigma)
        out = sd_call(net, self.scheduler.precondition_inputs(x, s), c_noise, condition)
        denoised = self.scheduler.precondition_outputs(x, out, s)
        return obj.edm_weight(sigma, EDM_SIGMA_DATA) * obj.per_sample_mse(denoised, x0)

    noise_distribution = {"p_mean": -1.2, "p_std": 1.2}  # EDM Table 1 (ln sigma ~ N(P_mean, P_std^2))
