"""Training cost of sCD against plain diffusion training, broken into its parts, for any network.

For one model and batch: forward (no grad), a diffusion training step (fwd + bwd + Adam), and the sCD step's
parts - teacher forward, JVP of the student, student forward+backward, optimizer - plus the whole sCD step;
peak memory of both steps; ratios sCD / diffusion and JVP / forward. Weights are random: cost does not depend
on them. Precision "bf16" is autocast with fp32 weights (as in the measured anchors of ECOSYSTEM.md).

    python -m scm_distill.evaluation.cost --suite cpu-small --output cost.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from torch import nn

from ..objective import SCDConfig, SCDLoss
from ..parameterization import Condition, NativeModel, NetworkCall, freeze, unet2d_call
from ..processes import VPProcess
from ..student import student_from_teacher
from ..trigflow import expand_as
from .timing import measure


@dataclass
class CostCase:
    """A network to cost, how to call it, and the shape of one sample."""

    name: str
    make_network: Callable[[], nn.Module]
    call: NetworkCall
    sample_shape: tuple[int, ...]
    batch_size: int
    make_condition: Callable[[int, torch.device], Condition] = field(default=lambda B, device: {})


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_cost(case: CostCase, device: torch.device, precision: str = "fp32", attention: str = "auto",
                  compile_jvp: bool = False, warmup: int = 2, repeats: int = 5) -> dict:  # fmt: skip
    """Median times (ms) and peak memory of every part of a diffusion step and of an sCD step (with the JVP
    compiled when `compile_jvp`; its compilation happens in the warm-up and is timed separately)."""
    torch.manual_seed(0)
    network = case.make_network().to(device)
    process = VPProcess(DDPMScheduler().alphas_cumprod, 0.5).to(device)
    teacher = NativeModel(freeze(copy.deepcopy(network)), process, "epsilon", 0.5, case.call)
    student = student_from_teacher(teacher).to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-5)
    B = case.batch_size
    x0 = torch.randn(B, *case.sample_shape, device=device)
    condition = case.make_condition(B, device)
    tau = torch.randint(0, 1000, (B,), device=device)
    t = torch.full((B,), 1.0, device=device)
    x_t = torch.cos(t).view(-1, *[1] * len(case.sample_shape)) * x0 + 0.5 * torch.randn_like(x0)
    scd = SCDLoss(teacher, SCDConfig(attention=attention, tangent_warmup_steps=0, compile_jvp=compile_jvp))
    amp = _autocast(device, precision)
    with torch.no_grad(), amp:
        dxdt = teacher.velocity(x_t, t, condition)
    cs = torch.cos(t) * torch.sin(t)
    v_x = expand_as(cs, x_t) * dxdt

    def forward():
        with torch.no_grad(), amp:
            case.call(student.network, x0, tau, condition)

    def diffusion_step():
        with amp:
            out = case.call(student.network, x0, tau, condition)
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_forward():
        with torch.no_grad(), amp:
            teacher.velocity(x_t, t, condition)

    def jvp():
        with amp:
            scd._jvp(student, x_t, t, condition, v_x, cs)

    def student_forward_backward():
        with amp:
            F, logvar = student(x_t, t, condition)
        (F.float().square().mean() + logvar.mean()).backward()
        student.zero_grad(set_to_none=True)

    def optimizer_step():
        for p in student.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def scd_step():
        with amp:
            loss, _ = scd(student, student, x0, condition, 1, torch.Generator().manual_seed(0))
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    compile_ms = measure(jvp, device, warmup=0, repeats=1).median_ms if compile_jvp else None  # first call compiles
    parts = {"forward": forward, "diffusion_step": diffusion_step, "teacher_forward": teacher_forward, "jvp": jvp,
             "student_forward_backward": student_forward_backward, "optimizer_step": optimizer_step,
             "scd_step": scd_step}  # fmt: skip
    timings = {name: measure(fn, device, warmup, repeats).as_dict() for name, fn in parts.items()}
    ms = {name: timing["median_ms"] for name, timing in timings.items()}
    return {
        "case": case.name, "precision": precision, "attention": attention, "compile_jvp": compile_jvp,
        "first_jvp_call_ms": compile_ms, "batch_size": B,
        "parameters_M": round(sum(p.numel() for p in network.parameters()) / 1e6, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "timings": timings,
        "scd_over_diffusion": round(ms["scd_step"] / ms["diffusion_step"], 3),
        "jvp_over_forward": round(ms["jvp"] / ms["forward"], 3),
    }  # fmt: skip


def finite_difference_error(case: CostCase, device: torch.device, precision: str = "fp32",
                            steps: tuple[float, ...] = (1e-2, 1e-3, 1e-4)) -> dict:  # fmt: skip
    """Relative error ||FD - JVP|| / ||JVP|| of the central finite-difference tangent (objective's fallback) against
    the exact torch.func.jvp, at the sCD tangent of a random point, for several step sizes h."""
    torch.manual_seed(0)
    network = case.make_network().to(device)
    process = VPProcess(DDPMScheduler().alphas_cumprod, 0.5).to(device)
    teacher = NativeModel(freeze(copy.deepcopy(network)), process, "epsilon", 0.5, case.call)
    student = student_from_teacher(teacher).to(device).eval()
    B = case.batch_size
    x_t = 0.5 * torch.randn(B, *case.sample_shape, device=device)
    t = torch.linspace(0.2, 1.5, B, device=device)
    condition = case.make_condition(B, device)
    amp = _autocast(device, precision)
    with torch.no_grad(), amp:
        dxdt = teacher.velocity(x_t, t, condition)
    cs = torch.cos(t) * torch.sin(t)
    v_x = expand_as(cs, x_t) * dxdt.float()
    with amp:
        exact = SCDLoss(teacher, SCDConfig())._jvp(student, x_t, t, condition, v_x, cs)[1].float()
    errors = {}
    for h in steps:
        with amp:
            fd = SCDLoss(teacher, SCDConfig(jvp="finite_difference", finite_difference_h=h))._jvp(
                student, x_t, t, condition, v_x, cs)[1].float()  # fmt: skip
        errors[f"h={h:g}"] = round(((fd - exact).norm() / exact.norm()).item(), 6)
    return {"case": case.name, "precision": precision, "relative_error": errors}


# --- model cases -------------------------------------------------------------------------------------------


def unet2d_case(name: str, size: int, widths: tuple[int, ...], attention_levels: tuple[int, ...], layers: int,
                batch_size: int, channels: int = 3, groups: int = 32) -> CostCase:  # fmt: skip
    from diffusers import UNet2DModel

    down = tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(len(widths)))
    up = tuple("AttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(len(widths))))

    def make():
        return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=widths,
                           down_block_types=down, up_block_types=up, layers_per_block=layers,
                           norm_num_groups=groups, downsample_padding=0, freq_shift=1, flip_sin_to_cos=False,
                           norm_eps=1e-6)  # fmt: skip

    return CostCase(name, make, unet2d_call, (channels, size, size), batch_size)


def ddpm_cifar10_case(batch_size: int = 128) -> CostCase:
    """The google/ddpm-cifar10-32 layout: 35.7M parameters, attention at 16x16."""
    return unet2d_case("ddpm-cifar10-32 UNet2DModel", 32, (128, 256, 256, 256), (1,), 2, batch_size)


def dit_case(tokens: int, batch_size: int, depth: int = 28, heads: int = 16, head_dim: int = 72) -> CostCase:
    """DiT-XL/2 by default (depth 28, hidden 1152), class-conditional, 4 latent channels, patch 2."""
    from diffusers import DiTTransformer2DModel

    side = int(round(tokens**0.5)) * 2

    def make():
        return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                     out_channels=8, num_layers=depth, sample_size=side, patch_size=2)  # fmt: skip

    def call(network, x, time, condition):
        return network(x, timestep=time, class_labels=condition["class_labels"]).sample[:, :4]

    def condition(B, device):
        return {"class_labels": torch.randint(0, 1000, (B,), device=device)}

    return CostCase(f"DiT (depth {depth}, {heads}x{head_dim}) at {tokens} tokens", make, call, (4, side, side),
                    batch_size, condition)  # fmt: skip


def sd_unet_case(batch_size: int, latent_size: int = 64, widths: tuple[int, ...] = (320, 640, 1280, 1280),
                 layers: int = 2, text_tokens: int = 77, text_dim: int = 768, heads: int = 8) -> CostCase:  # fmt: skip
    """The Stable Diffusion 1.5 UNet2DConditionModel layout by default (860M parameters, cross-attention to 77 text
    states of width 768, 4 latent channels; 64x64 latents = 512 px)."""
    from diffusers import UNet2DConditionModel

    from ..families.sd import unet_call

    down = ("CrossAttnDownBlock2D",) * (len(widths) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(widths) - 1)

    def make():
        return UNet2DConditionModel(sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=widths,
                                    down_block_types=down, up_block_types=up, layers_per_block=layers,
                                    cross_attention_dim=text_dim, attention_head_dim=heads,
                                    norm_num_groups=min(32, widths[0]))  # fmt: skip

    def condition(B, device):
        return {"encoder_hidden_states": torch.randn(B, text_tokens, text_dim, device=device)}

    return CostCase(f"SD-size UNet2DConditionModel ({'-'.join(map(str, widths))}) at {latent_size}x{latent_size} "
                    f"latents", make, unet_call, (4, latent_size, latent_size), batch_size, condition)  # fmt: skip


def demo_unet_case() -> CostCase:
    return unet2d_case("UNet2DModel 16px (demo size)", 16, (32, 64, 64), (1,), 1, 64, 1, 8)


# Suites: (case factory, precision, attention, compile_jvp) in the order they run (most important first).
SUITES = {
    "cpu-small": [(demo_unet_case, "fp32", "auto", False), (demo_unet_case, "fp32", "auto", True)],
    "gpu": [
        (lambda: ddpm_cifar10_case(128), "bf16", "auto", False),
        (lambda: ddpm_cifar10_case(128), "bf16", "math", True),  # compiled: the fused kernel is not traced
        (lambda: dit_case(4096, 4), "bf16", "auto", False),
        (lambda: sd_unet_case(8), "bf16", "auto", False),
        (lambda: dit_case(1024, 16), "bf16", "math", True),
        (lambda: ddpm_cifar10_case(128), "fp32", "auto", False),
        (lambda: dit_case(1024, 16), "bf16", "auto", False),
        (lambda: ddpm_cifar10_case(128), "bf16", "math", False),
        (lambda: dit_case(1024, 16), "fp32", "auto", False),
    ],
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="sCD vs diffusion training cost")
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu-small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, required=True, help="JSON lines, one record per measurement")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for make_case, precision, attention, compile_jvp in SUITES[args.suite]:
        record = training_cost(make_case(), device, precision, attention, compile_jvp, repeats=args.repeats)
        with args.output.open("a") as f:  # one record at a time: a late crash keeps the earlier ones
            f.write(json.dumps(record) + "\n")
        keys = ("case", "precision", "attention", "compile_jvp", "scd_over_diffusion", "jvp_over_forward")
        summary = {k: record[k] for k in keys}
        print(json.dumps(summary), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
