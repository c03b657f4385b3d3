"""A user's own denoiser, not a diffusers model: a small pixel UNet that predicts eps for greyscale 32x32 images.

Self-contained (torch only): the teacher folder carries a copy of this file next to its weights and JSON.
Its own conventions, as a user's network has them:
- images in [-0.5, 0.5] (not [-1, 1]), 1 channel, 32x32;
- time input t = i / T in [0, 1) for the discrete timestep i of a T = 1000 step cosine VP schedule (not 0..999);
- class_labels in 0..9, or None (or 10) for the unconditional branch (trained with 10% label dropout).
The 32x32 image is folded into 4 channels at 16x16 (pixel unshuffle) and unfolded at the output, so the UNet
runs at 16x16 / 8x8 / 4x4 with self-attention at 8x8.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 1000 t (t in [0, 1)) with periods up to 10,000: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding added in between, a 1x1 skip when the width changes."""

    def __init__(self, c_in: int, c_out: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(e)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.out = nn.GroupNorm(8, c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # [B, HW, C] each
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(a.transpose(1, 2).reshape(B, C, H, W))


class PixelUNet(nn.Module):
    """eps-prediction UNet: forward(x [B, 1, 32, 32] in the [-0.5, 0.5] data frame, t [B] or scalar in [0, 1),
    class_labels [B] or None) -> eps [B, 1, 32, 32]."""

    def __init__(self, width: int = 64, emb: int = 128, num_classes: int = 10):
        super().__init__()
        c1, c2 = width, 2 * width
        self.num_classes = num_classes
        self.time = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(num_classes + 1, emb)  # row num_classes: unconditional
        self.inp = nn.Conv2d(4, c1, 3, padding=1)
        self.down1, self.down2, self.down3 = ResBlock(c1, c1, emb), ResBlock(c1, c2, emb), ResBlock(c2, c2, emb)
        self.attn_down, self.mid, self.attn_up = SelfAttention(c2), ResBlock(c2, c2, emb), SelfAttention(c2)
        self.up3, self.up2, self.up1 = ResBlock(2 * c2, c2, emb), ResBlock(2 * c2, c2, emb), ResBlock(c2 + c1, c1, emb)
        self.out_norm, self.out = nn.GroupNorm(8, c1), nn.Conv2d(c1, 4, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        t = t.expand(B) if t.dim() == 0 else t
        if class_labels is None:
            class_labels = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
        e = self.time(timestep_features(t, self.label.embedding_dim)) + self.label(class_labels)
        h1 = self.down1(self.inp(F.pixel_unshuffle(x, 2)), e)  # [B, c1, 16, 16]
        h2 = self.attn_down(self.down2(F.avg_pool2d(h1, 2), e))  # [B, c2, 8, 8]
        h3 = self.down3(F.avg_pool2d(h2, 2), e)  # [B, c2, 4, 4]
        h = self.mid(h3, e)
        h = self.up3(torch.cat([h, h3], 1), e)
        h = self.attn_up(self.up2(torch.cat([F.interpolate(h, scale_factor=2.0), h2], 1), e))
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0), h1], 1), e)
        return F.pixel_shuffle(self.out(F.silu(self.out_norm(h))), 2)
