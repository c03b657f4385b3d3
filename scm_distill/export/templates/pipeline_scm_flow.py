"""Two-step sCM samplers for distilled flow-matching transformers (exported by scm-distill; torch and diffusers only).

Method: C. Lu, Y. Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
arXiv 2410.11081v2, Sec. 5.2, in flow-matching coordinates x_s = (1 - s) x0 + s eps (SANA-Sprint, arXiv
2503.09641). The transformer predicts the flow velocity u = eps - x0; its consistency function is its x0 estimate
x0 = x_s - s u, and re-noising to flow time s' is x = (1 - s') x0 + s' n. A stock `FlowMatchLCMScheduler` with
shift 1 and explicit `sigmas = [s_max, s_mid]` performs exactly these steps (`flow_consistency_loop`). The
pipelines below subclass the stock ones for their prompt encoding, latents and decoding, and add the distilled
student's guidance-scale input; their default call is the 2-step student at the distilled guidance scale.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers import SanaPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.sana.pipeline_output import SanaPipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, scheduler timestep) -> u


@torch.no_grad()
def flow_consistency_loop(velocity: Velocity, latents: torch.Tensor, scheduler, sigmas: list[float],
                          generator=None) -> torch.Tensor:  # fmt: skip
    """The multistep consistency sampler on FlowMatchLCMScheduler: at each s_i, x0 = x - s_i u(x, s_i), then
    x = (1 - s_{i+1}) x0 + s_{i+1} n with fresh noise n (s = 0 after the last step, which returns x0)."""
    scheduler.set_timesteps(sigmas=sigmas, device=latents.device)
    for t in scheduler.timesteps:
        latents = scheduler.step(velocity(latents, t), t, latents, generator=generator, return_dict=False)[0]
    return latents


def consistency_sigmas(sigmas: list[float], num_inference_steps: int) -> list[float]:
    """[s_max] for 1 step, [s_max, s_mid] for 2 (the distilled sampler's flow times)."""
    if num_inference_steps not in (1, 2):
        raise ValueError(f"num_inference_steps must be 1 or 2 for this consistency model, got {num_inference_steps}.")
    return list(sigmas)[:num_inference_steps]


def prompt_list(prompt: str | list[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


class SCMStableDiffusion3Pipeline(StableDiffusion3Pipeline):
    """`pipe(prompt, generator=...)`: the distilled SD3 student, 2 network evaluations, no CFG branch."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->guidance_embedder->transformer->vae"

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3, tokenizer_3, guidance_embedder, image_encoder=None, feature_extractor=None,
                 sigmas: list[float] | None = None, guidance_scale: float = 1.5, height: int = 1024,
                 width: int = 1024, max_sequence_length: int = 256):  # fmt: skip
        super().__init__(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                         tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                         text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, image_encoder=image_encoder,
                         feature_extractor=feature_extractor)  # fmt: skip
        self.register_modules(guidance_embedder=guidance_embedder)
        self.register_to_config(sigmas=list(sigmas or [1.0]), guidance_scale=guidance_scale, height=height,
                                width=width, max_sequence_length=max_sequence_length)  # fmt: skip

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 2, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, generator=None, output_type: str = "pil",
                 return_dict: bool = True):  # fmt: skip
        device, prompts = self._execution_device, prompt_list(prompt)
        embeds, _, pooled, _ = self.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  max_sequence_length=self.config.max_sequence_length)  # fmt: skip
        batch_size = len(prompts)
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        s = torch.full((batch_size,), float(scale), device=device, dtype=torch.float32)
        latents = self.prepare_latents(batch_size, self.transformer.config.in_channels, height or self.config.height,
                                       width or self.config.width, embeds.dtype, device, generator)  # fmt: skip

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self.guidance_embedder.added_to(self.transformer, s):
                return self.transformer(hidden_states=x, timestep=t.expand(batch_size), encoder_hidden_states=embeds,
                                        pooled_projections=pooled, return_dict=False)[0]  # fmt: skip

        sigmas = consistency_sigmas(self.config.sigmas, num_inference_steps)
        latents = flow_consistency_loop(velocity, latents, self.scheduler, sigmas, generator)
        if output_type == "latent":
            images = latents
        else:
            latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
            images = self.image_processor.postprocess(self.vae.decode(latents.to(self.vae.dtype)).sample,
                                                      output_type=output_type)  # fmt: skip
        self.maybe_free_model_hooks()
        return StableDiffusion3PipelineOutput(images=images) if return_dict else (images,)


# SanaPipeline's own default prompt preamble (its __call__ default), used for the prompts as in training.
SANA_INSTRUCTION = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


class SCMSanaPipeline(SanaPipeline):
    """`pipe(prompt, generator=...)`: the distilled Sana student, 2 network evaluations; the guidance scale is the
    transformer's guidance-embedding input (times `guidance_embeds_scale`, as SANA-Sprint feeds it)."""

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler, sigmas: list[float] | None = None,
                 guidance_scale: float = 1.5, height: int = 1024, width: int = 1024,
                 max_sequence_length: int = 300):  # fmt: skip
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                         scheduler=scheduler)  # fmt: skip
        self.register_to_config(sigmas=list(sigmas or [1.0]), guidance_scale=guidance_scale, height=height,
                                width=width, max_sequence_length=max_sequence_length)  # fmt: skip

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 2, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, generator=None, output_type: str = "pil",
                 return_dict: bool = True):  # fmt: skip
        device, prompts = self._execution_device, prompt_list(prompt)
        embeds, mask, _, _ = self.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                clean_caption=False,
                                                max_sequence_length=self.config.max_sequence_length,
                                                complex_human_instruction=SANA_INSTRUCTION)  # fmt: skip
        batch_size, config = len(prompts), self.transformer.config
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        guidance = torch.full((batch_size,), float(scale), device=device, dtype=torch.float32)
        latents = self.prepare_latents(batch_size, config.in_channels, height or self.config.height,
                                       width or self.config.width, torch.float32, device, generator)  # fmt: skip

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                    timestep=t.expand(batch_size) * config.timestep_scale,
                                    guidance=guidance * config.guidance_embeds_scale, return_dict=False)[0]  # fmt: skip

        sigmas = consistency_sigmas(self.config.sigmas, num_inference_steps)
        latents = flow_consistency_loop(velocity, latents, self.scheduler, sigmas, generator)
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return SanaPipelineOutput(images=images) if return_dict else (images,)
