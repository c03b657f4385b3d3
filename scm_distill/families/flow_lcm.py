"""The sCM sampler as diffusers' stock `FlowMatchLCMScheduler` on a flow-matching teacher's flow times.

arXiv 2410.11081v2 Sec. 5.2: x0 = f(x, t_max), x = cos t_mid x0 + sin t_mid z', x0 = f(x, t_mid). In flow coordinates
x_s = x_t / (cos t + sigma_d sin t), s = sigma_d sin t / (cos t + sigma_d sin t), the consistency function of a
network read as flow velocity u is its x0 estimate x_s - s u (Eq. 5, 23), and re-noising cos t x0 + sin t sigma_d n
reads x_s = (1 - s) x0 + s n with the same unit noise n. FlowMatchLCMScheduler.step does exactly x0 = x - s u,
x <- (1 - s') x0 + s' n (s' = 0 after the last step: x0 itself; it still draws one noise tensor), and with shift 1
and no dynamic shifting `set_timesteps(sigmas=...)` keeps the flow times as given (in float32). The one difference
from the TrigFlow sampler is the start: the pipelines draw x ~ N(0, I) as x_s at s_max, i.e. the TrigFlow z scaled
by sin t_max / s_max (exactly 1 at t_max = pi/2; 1.012 at the paper's sigma_max = 80, which is why the flow recipes
set sampling.sigma_max large). The toolkit's sampler for these families is this module's, so the exports reproduce
it bit for bit; the loop itself is the exported pipeline file's (`flow_consistency_loop`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import FlowMatchLCMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..export.templates.pipeline_scm_flow import flow_consistency_loop
from ..parameterization import Condition, NativeModel
from ..processes import FlowProcess
from ..trigflow import consistency_times

PipelineTime = Callable[[Tensor, Tensor], Tensor]  # (scheduler timestep t [B], latents) -> network time [B]


def consistency_sigmas(process: FlowProcess, num_steps: int, t_max: float, t_mid: float) -> list[float]:
    """Flow times s of the consistency sampler's TrigFlow times (Sec. 5.2)."""
    times = torch.tensor(consistency_times(num_steps, t_max, t_mid), dtype=torch.float64)
    return process.flow_time(times).tolist()


def flow_lcm_scheduler(num_train_timesteps: int = 1000) -> FlowMatchLCMScheduler:
    """A stock FlowMatchLCMScheduler that keeps explicit sigmas as given (shift 1, no dynamic shifting)."""
    return FlowMatchLCMScheduler(num_train_timesteps=num_train_timesteps, shift=1.0, use_dynamic_shifting=False)


def identity(x: Tensor) -> Tensor:
    return x


@torch.no_grad()
def flow_lcm_consistency_samples(model: NativeModel, shape: tuple[int, ...], sigmas: list[float], generator,
                                 condition: Condition, device, pipeline_time: PipelineTime,
                                 pack: Callable[[Tensor], Tensor] = identity,
                                 unpack: Callable[[Tensor], Tensor] = identity) -> Tensor:  # fmt: skip
    """x0 samples [B, ...] as the flow pipelines draw them: starting noise of `shape` (packed by `pack` where the
    pipeline samples in packed tokens), then per flow time one network call on the pipeline's time input and one
    FlowMatchLCMScheduler step, which draws the re-noising noise, all from `generator` in the pipelines' order."""
    latents = pack(randn_tensor(shape, generator=generator, device=device, dtype=torch.float32))

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        time = pipeline_time(t.expand(x.shape[0]), x)
        return pack(model.network_call(model.network, unpack(x), time, condition))

    return unpack(flow_consistency_loop(velocity, latents, flow_lcm_scheduler(), sigmas, generator))
