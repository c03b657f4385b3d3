"""Deterministic dropout: every forward of the student network in one step draws the same masks.

Dropout draws from torch's default generator (CPU, or the device's). While `SeededDropout.step(seed)` is active,
a forward pre-hook re-seeds that generator with the step's seed before every training-mode forward of the
network, so the JVP pass and the gradient pass (and the three evaluations of a finite-difference JVP) see
identical masks, and the masks are a pure function of (seed, rank, step): runs are reproducible and resume
exactly. The step runs inside `torch.random.fork_rng`, so the caller's generator state is restored afterwards.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch


class SeededDropout:
    """Hooks one network; `with seeded.step(seed, device):` seeds its dropout for one optimizer step."""

    def __init__(self, network: torch.nn.Module):
        self.seed: int | None = None
        self.handle = network.register_forward_pre_hook(self._reseed)

    def _reseed(self, module: torch.nn.Module, args) -> None:
        if self.seed is not None and module.training:
            torch.manual_seed(self.seed)

    @contextmanager
    def step(self, seed: int, device: torch.device):
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            self.seed = seed
            try:
                yield
            finally:
                self.seed = None

    def remove(self) -> None:
        self.handle.remove()


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """Seed of one step's dropout masks: a 32-bit hash of (seed, rank, step), a stream apart from the step's noise
    generator (torch's CPU generator keeps only the low 32 bits of a seed, so offsets would not separate them)."""
    digest = hashlib.blake2b(f"dropout:{seed}:{rank}:{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")
