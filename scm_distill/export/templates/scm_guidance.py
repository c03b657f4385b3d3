"""A guidance-scale input for transformers that have none (written by scm-distill; needs only torch and diffusers).

Method: C. Lu, Y. Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
arXiv 2410.11081v2, Sec. 5.2 and App. G.2: the distilled student takes the classifier-free guidance scale s as an
input, a positional embedding of s followed by a linear layer whose output is added to the time embedding. The
linear layer starts at zero, so the student starts equal to its teacher. `added_to(transformer, s)` adds the
embedding of s [B] to the output of every module of `transformer` named in `target_modules` (its time
embeddings) for the calls made inside the block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin


class SCMGuidanceEmbedding(ModelMixin, ConfigMixin):
    """s [B] -> linear(sinusoidal((s - 1) * 1000)) [B, out_dim], zero-initialised; added to `target_modules`."""

    @register_to_config
    def __init__(self, out_dim: int, in_dim: int = 256, target_modules: tuple[str, ...] = ()):
        super().__init__()
        self.linear = torch.nn.Linear(in_dim, out_dim)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        # w = s - 1 as in diffusers' LCM guidance embedding; sinusoidal features as the time embeddings use
        w = (s.float() - 1) * 1000.0
        features = get_timestep_embedding(w, self.config.in_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.linear(features.to(self.linear.weight.dtype))

    @contextmanager
    def added_to(self, transformer: torch.nn.Module, s: torch.Tensor) -> Iterator[None]:
        """Within the block, each target module of `transformer` returns its output + the embedding of s."""
        g = self(s)

        def add(module, args, output):
            return output + g.to(output.dtype)

        handles = [transformer.get_submodule(name).register_forward_hook(add) for name in self.config.target_modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
