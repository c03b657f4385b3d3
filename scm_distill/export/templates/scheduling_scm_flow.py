"""The sCM sampler of a distilled flow-matching transformer as a scheduler (written by scm-distill; torch + diffusers).

Method: C. Lu, Y. Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
arXiv 2410.11081v2, Sec. 5.2, in flow coordinates x_s = (1 - s) x0 + s eps (SANA-Sprint, arXiv 2503.09641). The
transformer predicts the velocity u = eps - x0, so its consistency function is its x0 estimate x0 = x_s - s u, and
re-noising to the next flow time s' is x = (1 - s') x0 + s' n: exactly `FlowMatchLCMScheduler.step`. This
scheduler only fixes the flow times of the distilled sampler: `set_timesteps(1)` is [s_max], `set_timesteps(2)` is
[s_max, s_mid] (the distilled times, in the config), and n > 2 steps use the even grid s_max (1 - i / n) (multistep
consistency sampling; not distilled). Any sigmas or shift a pipeline passes are ignored (`use_flow_sigmas`).

Re-noising noise: from the generator the pipeline passes to `step`; pipelines that pass none (FluxPipeline,
StableDiffusion3Pipeline) get, for each sample of the batch, a generator seeded by a hash of that sample's starting
noise, so the pipeline's own `generator` fixes every output (one generator per sample reproduces each sample) and
torch's global random state is never used.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from diffusers import FlowMatchLCMScheduler
from diffusers.configuration_utils import register_to_config


def seeded_by_content(sample: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per sample [B, ...], seeded by a hash of its float32 bytes."""
    generators = []
    for item in sample.detach().float().cpu():
        digest = hashlib.blake2b(item.contiguous().numpy().tobytes(), digest_size=8).digest()
        generators.append(torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1)))
    return generators


def consistency_flow_times(s_max: float, s_mid: float, num_inference_steps: int) -> list[float]:
    """[s_max] for 1 step, [s_max, s_mid] for 2, the even grid s_max (1 - i / n) for more."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
    if num_inference_steps == 2:
        return [s_max, s_mid]
    return [s_max * (1 - i / num_inference_steps) for i in range(num_inference_steps)]


class SCMFlowMatchScheduler(FlowMatchLCMScheduler):
    """FlowMatchLCMScheduler on the distilled flow times, re-noising deterministically (module docstring)."""

    __module__ = "scheduling_scm_flow"  # the name diffusers writes into model_index.json when a pipeline is saved
    _compatibles = ["FlowMatchLCMScheduler"]  # its config keys (kept by the parent's __init__) load silently

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, s_max: float = 1.0, s_mid: float = 0.5,
                 use_flow_sigmas: bool = True):  # fmt: skip
        super().__init__(num_train_timesteps=num_train_timesteps, shift=1.0, use_dynamic_shifting=False)
        self._noise_generators = None

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None,
                      timesteps=None) -> None:  # fmt: skip
        if num_inference_steps is None:
            num_inference_steps = len(sigmas if sigmas is not None else timesteps)
        times = consistency_flow_times(self.config.s_max, self.config.s_mid, num_inference_steps)
        super().set_timesteps(sigmas=times, device=device)
        self._noise_generators = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict=True):
        if generator is None:
            if self._noise_generators is None:
                self._noise_generators = seeded_by_content(sample)
            generator = self._noise_generators
        return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """The config, and this file next to it (diffusers drops repo code when it saves a pipeline)."""
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        shutil.copyfile(__file__, Path(save_directory) / "scheduling_scm_flow.py")
