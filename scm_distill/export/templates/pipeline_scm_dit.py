"""The distilled sCM student of a DiT as a `DiTPipeline` (written by scm-distill; needs only torch and diffusers).

Method: C. Lu, Y. Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
arXiv 2410.11081v2, Sec. 5.2. The transformer is a class-conditional DiT read as v-prediction on the
variance-preserving schedule of a stock `LCMScheduler`, whose step is the consistency function followed by
re-noising (x0 = f(x, t_max), x = cos t_mid x0 + sin t_mid z, x0 = f(x, t_mid)) at the integer timesteps its
`original_inference_steps` put on the 1- and 2-step grids. Classifier-free guidance is distilled: the
`guidance_embedder` adds the embedding of the guidance scale to the transformer's time embeddings, one network call
per step and no null-class branch. Stock `DiTPipeline` cannot express this (it runs CFG itself, takes no
guidance input and does not pass its generator to the scheduler), hence this subclass; the call is the stock one
with the distilled defaults: `pipe(class_labels=[...], num_inference_steps=2)`.
"""

from __future__ import annotations

import sys

import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, ImagePipelineOutput, LCMScheduler
from diffusers.utils.torch_utils import randn_tensor


class SCMDiTPipeline(DiTPipeline):
    """`pipe(class_labels, num_inference_steps=2)`: the distilled student at the distilled guidance scale."""

    __module__ = "pipeline_scm_dit"  # the file this class is shipped in
    model_cpu_offload_seq = "guidance_embedder->transformer->vae"

    def __init__(self, transformer: DiTTransformer2DModel, vae: AutoencoderKL, scheduler: LCMScheduler,
                 guidance_embedder: torch.nn.Module, id2label: dict[int, str] | None = None):  # fmt: skip
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        self.register_modules(guidance_embedder=guidance_embedder)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | int,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 2,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        device, dtype = self._execution_device, self.transformer.dtype
        labels = torch.tensor(class_labels, device=device).reshape(-1)
        batch_size, channels = labels.shape[0], self.transformer.config.in_channels
        size = self.transformer.config.sample_size
        s = self.guidance_embedder.scale(guidance_scale)

        shape = (batch_size, channels, size, size)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            with self.guidance_embedder.added_to(self.transformer, s):
                out = self.transformer(model_input, timestep=t.expand(batch_size), class_labels=labels).sample
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
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @classmethod
    def _get_signature_types(cls) -> dict:
        """`from_pipe` keeps a component only if its class is the annotated one: the guidance input's class is the
        one diffusers loaded from the folder's scm_guidance.py (or scm-distill's own copy of it)."""
        loaded = tuple(m.SCMGuidanceEmbedding for name, m in list(sys.modules.items())
                       if name.endswith("scm_guidance") and hasattr(m, "SCMGuidanceEmbedding"))  # fmt: skip
        return {**super()._get_signature_types(), "guidance_embedder": loaded}

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        self.guidance_embedder.ship_pipeline_code(self, save_directory, __file__)
