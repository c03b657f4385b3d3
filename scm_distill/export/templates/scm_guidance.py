"""A guidance-scale input for transformers that have none (written by scm-distill; needs only torch and diffusers).

Method: C. Lu, Y. Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
arXiv 2410.11081v2, Sec. 5.2 and App. G.2: the distilled student takes the classifier-free guidance scale s as an
input, a positional embedding of s followed by a linear layer whose output is added to the time embedding. The
linear layer starts at zero, so the student starts equal to its teacher. `added_to(transformer, s)` adds the
embedding of s to the output of every module of `transformer` named in `target_modules` (its time embeddings) for
the calls made inside the block. The config also records the scale the student was distilled at by default and the
range of scales it was trained on, which the pipelines use as their default and check.
"""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin


class SCMGuidanceEmbedding(ModelMixin, ConfigMixin):
    """s [B] or a float -> linear(sinusoidal((s - 1) * 1000)) [B, out_dim], zero-initialised; added to
    `target_modules`."""

    __module__ = "scm_guidance"  # the name diffusers writes into model_index.json when a pipeline is saved

    @register_to_config
    def __init__(self, out_dim: int, in_dim: int = 256, target_modules: tuple[str, ...] = (),
                 default_scale: float = 1.0, scale_range: tuple[float, float] = (1.0, 1.0)):  # fmt: skip
        super().__init__()
        self.linear = torch.nn.Linear(in_dim, out_dim)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        # w = s - 1 as in diffusers' LCM guidance embedding; sinusoidal features as the time embeddings use
        w = (s.float() - 1) * 1000.0
        features = get_timestep_embedding(w, self.config.in_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.linear(features.to(self.linear.weight.dtype))

    def scale(self, guidance_scale: float | None) -> float:
        """The call's guidance scale: the distilled default, or a given one inside the trained range."""
        if guidance_scale is None:
            return self.config.default_scale
        lo, hi = self.config.scale_range
        if not lo <= guidance_scale <= hi:
            raise ValueError(f"guidance_scale {guidance_scale} is outside the range this student was distilled on "
                             f"[{lo}, {hi}]; the default is {self.config.default_scale}.")  # fmt: skip
        return float(guidance_scale)

    def distilled_call(self, stock_call, transformer: torch.nn.Module, call: inspect.BoundArguments):
        """A stock pipeline call (`stock_call`, with the arguments the user gave) as the distilled student: 2 steps
        by default, the guidance scale (default: the distilled one) through this embedding. The pipeline using it
        turns its own CFG branch off (its `do_classifier_free_guidance` is False)."""
        kwargs = {k: v for k, v in call.arguments.items() if k != "self"}
        kwargs.setdefault("num_inference_steps", 2)
        s = self.scale(kwargs.pop("guidance_scale", None))
        with self.added_to(transformer, s):
            return stock_call(**kwargs, guidance_scale=s)

    @contextmanager
    def added_to(self, transformer: torch.nn.Module, s: torch.Tensor | float) -> Iterator[None]:
        """Within the block, each target module of `transformer` returns its output + the embedding of s."""
        s = torch.as_tensor(s, dtype=torch.float32, device=self.linear.weight.device).reshape(-1)
        g = self(s)

        def add(module, args, output):
            return output + g.to(output.dtype)

        handles = [transformer.get_submodule(name).register_forward_hook(add) for name in self.config.target_modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def ship_pipeline_code(pipeline, save_directory, source_file: str) -> None:
        """After a pipeline that uses this input is saved: its code file next to model_index.json, and its class named
        as repo code there (diffusers drops both when it saves a pipeline loaded with trust_remote_code)."""
        folder = Path(save_directory)
        shutil.copyfile(source_file, folder / f"{type(pipeline).__module__}.py")
        entries = json.loads((folder / "model_index.json").read_text())
        entries["_class_name"] = [type(pipeline).__module__, type(pipeline).__name__]
        (folder / "model_index.json").write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """The weights and config, and this file next to them (diffusers drops repo code when it saves)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        shutil.copyfile(__file__, Path(save_directory) / "scm_guidance.py")
