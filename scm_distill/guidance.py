"""Classifier-free guidance in sCD: a guided teacher and the guidance scale as a student input.

arXiv 2410.11081v2 Sec. 5.2 and App. G.2 (METHOD.md §4): the teacher target is dx_t/dt = sigma_d [F_u + s (F_c - F_u)]
with s drawn per sample from U[s_min, s_max] (paper: U[1, 2]); the student takes s as an extra input, zero-initialised
so that it starts equal to the teacher. CFG is linear and the map x0 -> F is affine with unit weight on x0, so
guiding the x0 estimates guides F (and eps, v) the same way.

Conditions are dicts: the network's conditional inputs at the top level, the unconditional branch's inputs under
"uncond" (same keys, same batch size) and the per-sample scales under "guidance_scale" [B]. The student's guidance
input follows diffusers' LCM convention, so that stock pipelines feed it: the embedding of w = s - 1 goes to
`UNet2DConditionModel(time_cond_proj_dim=...)` as `timestep_cond`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .errors import UserError
from .parameterization import Condition, NativeModel
from .trigflow import expand_as

GUIDANCE_KEYS = ("uncond", "guidance_scale")  # keys of a guided condition that are not network inputs


# Classifier-free guidance u + s (c - u), per-sample s [B] (Sec. 5.2; equally valid on eps, v, x0 or F).
def cfg_combine(cond: Tensor, uncond: Tensor, s: Tensor) -> Tensor:
    return uncond + expand_as(s.to(cond.dtype), cond) * (cond - uncond)


# Training guidance scales s ~ U[s_min, s_max] (App. G.2: U[1, 2]), drawn from the trainer's per-step generator.
def sample_guidance_scales(batch_size: int, s_min: float, s_max: float, generator: torch.Generator) -> Tensor:
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    return (s_min + (s_max - s_min) * u).float()


# Sinusoidal embedding of w = s - 1, scaled by 1000, [B] -> [B, dim] (VDM's / LCM's guidance embedding; the same
# values diffusers' SD/SDXL pipelines pass as `timestep_cond` for guidance_scale s).
def guidance_embedding(s: Tensor, dim: int) -> Tensor:
    w = (s.float() - 1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = w[:, None] * freqs[None, :].to(w.device)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))  # odd widths: one zero column


def network_inputs(condition: Condition) -> Condition:
    """The conditional branch's network inputs (everything but the guidance keys)."""
    return {key: value for key, value in condition.items() if key not in GUIDANCE_KEYS}


def concat_conditions(first: Any, *rest: Any) -> Any:
    """Stack conditions along the batch: tensors are concatenated, dicts merged key by key, other values (None,
    strings) must agree."""
    if isinstance(first, Tensor):
        return torch.cat([first, *rest])
    if isinstance(first, dict):
        for other in rest:
            if first.keys() != other.keys():
                raise UserError(f"conditions to stack have different keys: {sorted(first)} vs {sorted(other)}.")
        return {key: concat_conditions(first[key], *(other[key] for other in rest)) for key in first}
    for other in rest:
        if first != other:
            raise UserError(f"conditions to stack differ in a non-tensor value: {first!r} vs {other!r}.")
    return first


def expand_condition(condition: Any, batch_size: int) -> Any:
    """A condition of batch 1 (e.g. the negative prompt's) repeated to `batch_size`."""
    if isinstance(condition, Tensor):
        return condition.expand(batch_size, *condition.shape[1:])
    if isinstance(condition, dict):
        return {key: expand_condition(value, batch_size) for key, value in condition.items()}
    return condition


class GuidedModel(NativeModel):
    """A teacher read with classifier-free guidance: x0 = x0_u + s (x0_c - x0_u), hence F = F_u + s (F_c - F_u)
    and dx_t/dt = sigma_d [F_u + s (F_c - F_u)] (Sec. 5.2). Conditions without "uncond" are evaluated unguided.
    Both branches run as one network call on the doubled batch."""

    def x0(self, x_t: Tensor, t: Tensor, condition: Condition | None = None) -> Tensor:
        condition = condition or {}
        if "uncond" not in condition:
            return super().x0(x_t, t, network_inputs(condition))
        both = concat_conditions(network_inputs(condition), condition["uncond"])
        x0_c, x0_u = super().x0(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return cfg_combine(x0_c, x0_u, condition["guidance_scale"].to(x_t.device))


def guidance_range(s_min: float, s_max: float) -> tuple[float, float]:
    """Checked training range of guidance scales (one-sentence errors, as the CLI prints them)."""
    if not (math.isfinite(s_min) and math.isfinite(s_max)) or s_min < 1 or s_max < s_min:
        raise UserError(f"the guidance range [{s_min}, {s_max}] is not valid; scales start at 1 (no guidance).")
    return s_min, s_max
