"""Two-step sCM sampler for a distilled UNet2DModel (exported by scm-distill; needs only torch and diffusers).

Method: C. Lu, Y. Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
arXiv 2410.11081v2, Sec. 5.2. The UNet is a v-prediction network on the variance-preserving schedule of
`scheduler` (a stock DDPMScheduler config). It is read in TrigFlow time t: x_t = cos t x0 + sin t z with
z ~ N(0, sigma_data^2 I), F = (cos t x_t - x0_hat) / (sigma_data sin t), and sampled with the consistency
function f(x_t, t) = cos t x_t - sin t sigma_data F at t_max, then (2 steps) re-noised to t_mid.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape + (1,) * (x.dim() - t.dim()))


def consistency_times(num_steps: int, t_max: float, t_mid: float) -> list[float]:
    """[t_max] for 1 step, [t_max, t_mid] for 2, else an even grid in t from t_max towards 0."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_steps}.")
    if num_steps == 2:
        return [t_max, t_mid]
    return [t_max * (1 - i / num_steps) for i in range(num_steps)]


def log_sigma_edm_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    ab = alphas_cumprod.double()
    return 0.5 * (torch.log1p(-ab) - torch.log(ab))


def network_time(t: torch.Tensor, sigma_data: float, table: torch.Tensor) -> torch.Tensor:
    """Continuous DDPM timestep whose sigma/alpha equals sigma_data tan t (linear in log sigma_edm)."""
    value = torch.log(sigma_data * torch.tan(t))
    table = table.to(t.dtype)
    hi = torch.searchsorted(table, value.detach().contiguous()).clamp(1, table.numel() - 1)
    lo = hi - 1
    w = (value - table[lo]) / (table[hi] - table[lo])
    return lo.to(value.dtype) + w


class SCMUNet2DPipeline(DiffusionPipeline):
    """Consistency-model sampler: `pipe(batch_size=..., generator=..., num_inference_steps=2)`."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, sigma_data: float = 0.5,
                 t_max: float = 1.56455, t_mid: float = 1.1):  # fmt: skip
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(sigma_data=sigma_data, t_max=t_max, t_mid=t_mid)

    def trigflow_F(self, x_t: torch.Tensor, t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        sigma_data = self.config.sigma_data
        norm = torch.sqrt(torch.cos(t) ** 2 + (sigma_data * torch.sin(t)) ** 2)
        alpha, sigma = torch.cos(t) / norm, sigma_data * torch.sin(t) / norm
        x = x_t * _expand(alpha / torch.cos(t), x_t)
        v = self.unet(x, network_time(t, sigma_data, table)).sample
        x0_hat = _expand(alpha, x) * x - _expand(sigma, x) * v.to(x_t.dtype)
        return (_expand(torch.cos(t), x_t) * x_t - x0_hat) / (sigma_data * _expand(torch.sin(t), x_t))

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 2,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        device, dtype, sigma_data = self._execution_device, self.unet.dtype, self.config.sigma_data
        table = log_sigma_edm_table(self.scheduler.alphas_cumprod).to(device)

        times = consistency_times(num_inference_steps, self.config.t_max, self.config.t_mid)
        x = sigma_data * randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        for i, t in enumerate(self.progress_bar(times)):
            tt = torch.full((batch_size,), t, dtype=dtype, device=device)
            if i > 0:  # re-noise the previous x0 estimate to time t
                z = sigma_data * randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                x = _expand(torch.cos(tt), x) * x + _expand(torch.sin(tt), z) * z
            F = self.trigflow_F(x, tt, table)
            x = _expand(torch.cos(tt), x) * x - _expand(torch.sin(tt), x) * sigma_data * F  # f(x_t, t), Eq. 5

        image = (x / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
