"""Shared fixtures: tiny seeded teachers built in the test (no network), and a subprocess helper."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

REPO = Path(__file__).resolve().parent.parent


def tiny_unet(seed: int = 0, size: int = 8, channels: int = 1) -> UNet2DModel:
    """A UNet2DModel with one self-attention level, small enough for CPU tests."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, layers_per_block=1,
                       attention_head_dim=8)  # fmt: skip


def save_tiny_pipeline(folder: Path, prediction: str = "epsilon", beta_schedule: str = "linear", size: int = 8) -> Path:
    scheduler = DDPMScheduler(prediction_type=prediction, beta_schedule=beta_schedule)
    DDPMPipeline(unet=tiny_unet(size=size), scheduler=scheduler).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """An eps-prediction DDPMPipeline folder (8x8, 1 channel) matching the built-in 'digits' data."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("teacher") / "tiny-ddpm")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m scm_distill.cli ...` in a fresh process; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "scm_distill.cli", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def free_port() -> int:
    """A TCP port free on this machine now, for a torchrun rendezvous (tests run side by side under pytest-xdist)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(worker: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """torchrun of tests/<worker> on 2 CPU processes (gloo, one thread each) at a free rendezvous port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / worker), *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def tree(folder: Path) -> list[str]:
    """Every path under a folder (empty list if it does not exist) - to check nothing was written."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


class ToyNet(torch.nn.Module):
    """conv -> SDPA self-attention over pixels -> conv, with a smooth float64-safe time input (for derivative
    checks: UNet2DModel embeds time in float32, which finite differences cannot see through)."""

    def __init__(self, channels: int = 1, width: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.time = torch.nn.Linear(2, width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, time):
        time = time.to(x.dtype) * torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        feats = torch.stack([torch.sin(time / 300), torch.cos(time / 300)], dim=1)
        h = torch.nn.functional.silu(self.inp(x) + self.time(feats)[:, :, None, None])
        B, C, H, W = h.shape
        q, k, v = self.qkv(h.flatten(2).transpose(1, 2)).chunk(3, dim=-1)  # [B, HW, C] each
        a = torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return self.out(h + a.transpose(1, 2).reshape(B, C, H, W))


@pytest.fixture(scope="session")
def tiny_run(tiny_teacher, tmp_path_factory):
    """A 3-step distillation of the tiny teacher (conversion 1 + sCD 2) with its export."""
    from scm_distill.config import resolve
    from scm_distill.trainer import distill

    config = resolve(cli={"teacher": str(tiny_teacher), "output": str(tmp_path_factory.mktemp("run") / "run"),
                          "data": {"spec": "digits"},
                          "train": {"max_steps": 2, "convert_steps": 1, "batch_size": 8, "sample_every": 2,
                                    "checkpoint_every": 0}})  # fmt: skip
    return distill(config)


@pytest.fixture(scope="session", params=["unet2d", "sd", "sd-lora", "sdxl", "dit", "sd3", "sd3-lora", "flux",
                                         "flux-schnell", "sana", "edm", "edm-lora"])  # export_forms.FORMS
def export(request, tmp_path_factory):
    """Every export form: a tiny teacher of the family, 2 distillation steps, the export (built once a session)."""
    from export_forms import build_export

    return build_export(request.param, tmp_path_factory.mktemp(request.param))
