"""Two-step sCM sampler for a distilled EDM-preconditioned SDXL-layout UNet (e.g. Playground v2.5; exported by
scm-distill; needs only torch and diffusers).

Method: C. Lu, Y. Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
arXiv 2410.11081v2, Sec. 5.2, in EDM coordinates x_sigma = x0 + sigma eps (Karras et al. 2022). The UNet is
preconditioned as the teacher's EDM scheduler does it (`scheduler.precondition_inputs / _noise / _outputs`:
c_in, c_noise = log(sigma) / 4, c_skip, c_out), so D(x, sigma) is its denoised estimate, which is the consistency
function. TrigFlow time t is sigma = sigma_data tan t with the distillation's sigma_data (the config's, measured
on the latents; the scheduler's own sigma_data belongs to the network's preconditioning). The TrigFlow start
z ~ N(0, sigma_data^2 I) at t_max is x = sqrt(sigma_max^2 + sigma_data^2) n in EDM coordinates, and re-noising
cos t x0 + sin t z is x = x0 + sigma n.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

NetworkFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (c_in x, c_noise [B]) -> raw network output


def consistency_sigmas(t_max: float, t_mid: float, sigma_data: float, num_steps: int) -> list[float]:
    """EDM noise levels sigma = sigma_data tan t of the sCM times: [t_max], [t_max, t_mid], or an even grid in t."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_steps}.")
    times = [t_max, t_mid] if num_steps == 2 else [t_max * (1 - i / num_steps) for i in range(num_steps)]
    return [sigma_data * math.tan(t) for t in times]


def edm_denoise(scheduler, network: NetworkFn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D(x, sigma) = c_skip x + c_out net(c_in x, c_noise), with the EDM scheduler's own preconditioning; sigma [B]."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    out = network(scheduler.precondition_inputs(x, s), scheduler.precondition_noise(sigma))
    return scheduler.precondition_outputs(x, out.to(x.dtype), s)


@torch.no_grad()
def edm_consistency_loop(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                         sigmas: list[float], sigma_data: float, generator=None) -> torch.Tensor:  # fmt: skip
    """x0 = D(x, sigma_0) from x = sqrt(sigma_0^2 + sigma_data^2) n; then per sigma_i: x = x0 + sigma_i n',
    x0 = D(x, sigma_i)."""
    batch = noise.shape[0]
    x = noise * math.sqrt(sigmas[0] ** 2 + sigma_data**2)
    for i, sigma in enumerate(sigmas):
        if i > 0:
            x = x + sigma * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = denoise(x, torch.full((batch,), sigma, device=x.device, dtype=x.dtype))
    return x


class SCMEDMStableDiffusionXLPipeline(StableDiffusionXLPipeline):
    """`pipe(prompt, generator=...)`: the distilled student, 2 network evaluations at the distilled guidance scale
    (the UNet's `time_cond_proj_dim` input; students without it distilled CFG at one scale)."""

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder=None,
                 feature_extractor=None, force_zeros_for_empty_prompt: bool = True, add_watermarker: bool = False,
                 t_max: float = 1.56, t_mid: float = 1.1, sigma_data: float = 0.5, guidance_scale: float = 1.5,
                 height: int = 1024, width: int = 1024):  # fmt: skip
        super().__init__(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                         tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
                         feature_extractor=feature_extractor,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)  # fmt: skip
        self.register_to_config(t_max=t_max, t_mid=t_mid, sigma_data=sigma_data, guidance_scale=guidance_scale,
                                height=height, width=width)  # fmt: skip

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's input from the model's latents (per-channel statistics where the VAE has them)."""
        config = self.vae.config
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
            return latents / (config.scaling_factor / std) + mean
        return latents / config.scaling_factor

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 2, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, generator=None, output_type: str = "pil",
                 return_dict: bool = True):  # fmt: skip
        device = self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch_size, h, w = len(prompts), height or self.config.height, width or self.config.width
        embeds, _, pooled, _ = self.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)  # fmt: skip
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=embeds.dtype).to(device).repeat(batch_size, 1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        dim, scale = self.unet.config.time_cond_proj_dim, self.config.guidance_scale if guidance_scale is None \
            else guidance_scale  # fmt: skip
        s = torch.full((batch_size,), float(scale), device=device, dtype=torch.float32)
        timestep_cond = self.get_guidance_scale_embedding(s - 1, embedding_dim=dim).to(embeds.dtype) if dim else None

        def network(x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
            return self.unet(x, c_noise, encoder_hidden_states=embeds, timestep_cond=timestep_cond,
                             added_cond_kwargs=added).sample  # fmt: skip

        shape = (batch_size, self.unet.config.in_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        sigmas = consistency_sigmas(self.config.t_max, self.config.t_mid, self.config.sigma_data, num_inference_steps)
        latents = edm_consistency_loop(lambda x, sigma: edm_denoise(self.scheduler, network, x, sigma), noise, sigmas,
                                       self.config.sigma_data, generator)  # fmt: skip
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(self.decode_latents(latents).to(self.vae.dtype)).sample
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)
