"""Two-step sCM sampler for a distilled DiT (exported by scm-distill; needs only torch and diffusers).

Method: C. Lu, Y. Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
arXiv 2410.11081v2, Sec. 5.2. `transformer` is a class-conditional DiT read as v-prediction on the
variance-preserving schedule of `scheduler` (a stock LCMScheduler whose boundary condition applies the x0 estimate
as is), `guidance_embedder` adds the embedding of the guidance scale to its time embeddings (guidance_embedder/
scm_guidance.py). At the integer timesteps in the config (their TrigFlow times are t_max and t_mid) one
LCMScheduler step is the consistency function followed by re-noising: x0 = f(x, t_max), x = cos t_mid x0 + sin
t_mid z, x0 = f(x, t_mid). Classifier-free guidance is distilled: one network call per step, no null-class branch.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, ImagePipelineOutput, LCMScheduler
from diffusers.utils.torch_utils import randn_tensor


class SCMDiTPipeline(DiTPipeline):
    """`pipe(class_labels=[...], generator=...)`: 2 network evaluations at the distilled guidance scale."""

    model_cpu_offload_seq = "guidance_embedder->transformer->vae"

    def __init__(self, transformer: DiTTransformer2DModel, vae: AutoencoderKL, scheduler: LCMScheduler,
                 guidance_embedder: torch.nn.Module, id2label: dict[int, str] | None = None,
                 timesteps: list[int] | None = None, guidance_scale: float = 1.5):  # fmt: skip
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        self.register_modules(guidance_embedder=guidance_embedder)
        self.register_to_config(timesteps=list(timesteps or [999]), guidance_scale=guidance_scale)

    def consistency_timesteps(self, num_inference_steps: int) -> list[int]:
        """[tau_max] for 1 step, [tau_max, tau_mid] for 2 (the distilled sampler's integer timesteps)."""
        if num_inference_steps not in (1, 2):
            raise ValueError(f"num_inference_steps must be 1 or 2 for this consistency model, got "
                             f"{num_inference_steps}.")  # fmt: skip
        return list(self.config.timesteps)[:num_inference_steps]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int],
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 2,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        device = self._execution_device
        labels = torch.tensor(class_labels, device=device).reshape(-1)
        batch_size, channels = labels.shape[0], self.transformer.config.in_channels
        size = self.transformer.config.sample_size
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        s = torch.full((batch_size,), float(scale), device=device, dtype=torch.float32)

        shape = (batch_size, channels, size, size)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(timesteps=self.consistency_timesteps(num_inference_steps), device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            with self.guidance_embedder.added_to(self.transformer, s):
                out = self.transformer(latents, timestep=t.expand(batch_size), class_labels=labels).sample
            out = out[:, :channels]  # learned variance: the first C channels are the prediction
            latents = self.scheduler.step(out, t, latents, generator=generator, return_dict=False)[0]

        if output_type == "latent":
            images = latents
        else:
            images = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
            images = (images.float() / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
