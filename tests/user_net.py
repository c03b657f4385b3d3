"""A network of our own, as a user brings it (not a diffusers model): data in [-0.5, 0.5], time input t = i / 1000 in
[0, 1) for the discrete timestep i of a 1,000-step VP schedule, sinusoidal time features read by `time_in`.
Self-contained (torch only), so `--network tests/user_net.py:UserNet` can load an export of it."""

from __future__ import annotations

import torch
from torch import nn

K = 4  # sinusoidal time features: cos and sin at K frequencies
STEP_FREQUENCIES = 10_000.0 ** (-torch.arange(K, dtype=torch.float32) / K)  # rad per timestep: 1, 0.1, 0.01, 0.001
# rad per unit of the network's own time input t = i / 1000, per input column of time_in ([cos, sin])
FREQUENCIES = (1000.0 * STEP_FREQUENCIES).repeat(2)
DATA_RANGE = (-0.5, 0.5)


class UserNet(nn.Module):
    """eps-prediction: forward(x [B, 1, H, W] in [-0.5, 0.5], t [B] or scalar in [0, 1)) -> eps [B, 1, H, W]."""

    def __init__(self, width: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.time_in = nn.Linear(2 * K, width)
        self.inp = nn.Conv2d(1, width, 3, padding=1)
        self.out = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        angles = 1000.0 * t[:, None] * STEP_FREQUENCIES.to(x.device)[None]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(x.dtype)
        h = torch.nn.functional.silu(self.inp(x) + self.time_in(features)[:, :, None, None])
        return self.out(h)



class ClassNet(UserNet):
    """UserNet, class-conditional: forward(x, t, class_labels [B] or None) with labels 0..9 and 10 (also None) as
    the unconditional branch, each label adding its own learned bias to the features."""

    NUM_CLASSES = 10

    def __init__(self, width: int = 8, seed: int = 0):
        super().__init__(width, seed)
        self.label = nn.Embedding(self.NUM_CLASSES + 1, width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), self.NUM_CLASSES, dtype=torch.long, device=x.device)
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        angles = 1000.0 * t[:, None] * STEP_FREQUENCIES.to(x.device)[None]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(x.dtype)
        e = self.time_in(features) + self.label(class_labels)
        return self.out(torch.nn.functional.silu(self.inp(x) + e[:, :, None, None]))
