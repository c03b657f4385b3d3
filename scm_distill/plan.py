"""Know before you launch: per-GPU memory of a run under DDP and under FSDP on N processes (`scm-distill plan`).

Training state, from the parameter counts of the teacher's denoiser built on the meta device (architectures.py for
the recipes' Hub ids, the folder's own config for a local pipeline): float32 weights (bf16 autocast keeps them),
student P, gradients and two optimizer moments of the T trainable parameters, the EMA of the whole student, the
teacher (shared with a LoRA student) and the frozen encoders + VAE. DDP holds all of it on every GPU; FSDP divides
all but the encoders by N and adds the gather buffers of the largest unit (two in flight, bf16 with mixed precision)
and its float32 gradient before the reduce-scatter.

Activations: the bytes autograd saves in the gradient pass, counted on meta tensors at the run's latent size (exact
shapes, no memory or compute) at batch 1 and 2 (per sample = the difference). Attention is counted as a fused kernel
saves it (q, k, v, output, log-sum-exp), as on GPUs. With activation checkpointing: what is saved outside the
checkpointed blocks, plus their inputs, plus the largest block's own (recomputed one at a time in the backward). The
JVP and teacher passes run under no_grad and save nothing; their transients, the allocator's slack and the CUDA
context are what the 10% headroom of the fit check is for. `examples/memory_benchmark.py` checks the estimate against
a measured CPU peak at toy size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .architectures import EXAMPLE_INPUTS, TEACHERS, Architecture
from .config import DistillConfig
from .errors import UserError
from .lora import adapted_layers
from .parallel import launcher_settings, non_reentrant, unit_parameter_counts

FP32, BF16 = 4, 2  # bytes per value
HEADROOM = 0.9  # a plan fits when its total is at most this fraction of the GPU's memory


# --- the teacher's denoiser on meta -----------------------------------------------------------------------------


def local_architecture(folder: Path) -> Architecture:
    """A local pipeline folder: its denoiser's config, and the frozen components' parameters from their headers."""
    from safetensors import safe_open

    index = json.loads((folder / "model_index.json").read_text())
    name = "unet" if "unet" in index else "transformer"
    frozen = 0
    for path in folder.glob("*/*.safetensors"):
        if path.parent.name != name:
            with safe_open(path, "pt") as file:
                frozen += sum(math.prod(file.get_slice(key).get_shape()) for key in file.keys())
    config = json.loads((folder / name / "config.json").read_text())
    vae = folder / "vae" / "config.json"
    downsample = 2 ** (len(json.loads(vae.read_text())["block_out_channels"]) - 1) if vae.is_file() else 1
    return Architecture(index[name][1], config, frozen, downsample)


def architecture_of(teacher: str) -> Architecture:
    if teacher in TEACHERS:
        return TEACHERS[teacher]
    folder = Path(teacher).expanduser()
    if (folder / "model_index.json").is_file():
        return local_architecture(folder)
    raise UserError(f"there is no published config of teacher '{teacher}' here; give a local pipeline folder or "
                     f"one of {sorted(TEACHERS)}.")  # fmt: skip


def meta_denoiser(arch: Architecture, dtype: torch.dtype = torch.float32) -> nn.Module:
    cls = getattr(diffusers, arch.denoiser_class)
    config = {k: v for k, v in arch.config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return nn.Module.to(cls.from_config(config), dtype)  # nn.Module's: diffusers' own `to` warns about casts


# --- activations: bytes autograd saves in the gradient pass -----------------------------------------------------


class FusedAttentionMemory(torch.autograd.Function):
    """Stands in for SDPA on meta tensors, saving what a fused kernel saves: q, k, v, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the count stops at the end of the forward
        raise NotImplementedError


class FusedAttention(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = [*args, *(kwargs[name] for name in ("query", "key", "value")[len(args):])][:3]
            return FusedAttentionMemory.apply(q, k, v)
        return func(*args, **(kwargs or {}))


class SavedBytes:
    """Counts the distinct storages autograd saves (parameters excluded) while entered."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.seen, self.bytes = exclude, set(), 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in self.exclude and storage._cdata not in self.seen:
            self.seen.add(storage._cdata)
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def tensor_bytes(values, exclude: set[int]) -> int:
    seen = {}
    for value in values:
        if torch.is_tensor(value) and value.untyped_storage()._cdata not in exclude:
            seen[value.untyped_storage()._cdata] = value.untyped_storage().nbytes()
    return sum(seen.values())


def saved_activation_bytes(model: nn.Module, inputs: dict, checkpointing: bool) -> int:
    """Bytes the gradient pass of `model` (on meta) holds for the backward; see the module docstring."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    blocks = {"inputs": 0, "largest": 0}

    def measuring(module, *args):
        blocks["inputs"] += tensor_bytes(args, params)
        with SavedBytes(params) as inside:
            module(*args)
        blocks["largest"] = max(blocks["largest"], inside.bytes)
        return non_reentrant(module, *args)

    model.train().requires_grad_(True)
    if checkpointing:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=measuring)
    else:
        model.disable_gradient_checkpointing()
    with FusedAttention(), SavedBytes(params) as outside:
        model(**inputs)
    return outside.bytes + blocks["inputs"] + blocks["largest"]


def activations_per_sample(arch: Architecture, resolution: int, dtype: torch.dtype, checkpointing: bool) -> tuple:
    """(fixed bytes, bytes per sample) of the gradient pass at `resolution` pixels, from batches 1 and 2 on meta."""
    model = meta_denoiser(arch, dtype)
    side = max(resolution // arch.downsample, 1)
    with torch.device("meta"):
        batches = [EXAMPLE_INPUTS[arch.denoiser_class](arch.config, B, side, side, dtype) for B in (1, 2)]
    one, two = (saved_activation_bytes(model, inputs, checkpointing) for inputs in batches)
    return max(2 * one - two, 0), two - one


# --- the plan ---------------------------------------------------------------------------------------------------


def lora_parameters(network: nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters of rank-r adapters: r (fan-in + fan-out) per Linear, r (fan-in k^2 + fan-out) per Conv2d."""
    total = 0
    for module in adapted_layers(network, targets).values():
        if isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
        else:
            kh, kw = module.kernel_size
            total += rank * (module.in_channels // module.groups * kh * kw + module.out_channels)
    return total


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU bytes of one run under DDP and FSDP; counts in parameters, memory in bytes."""

    teacher: str
    processes: int
    batch_size: int  # per process and micro-batch
    grad_accum_steps: int
    resolution: int  # pixels
    mixed_precision: str
    checkpointing: bool
    student_params: int
    trainable_params: int
    teacher_params: int  # 0 when a LoRA student shares the teacher's network
    frozen_params: int
    largest_unit: int
    activations_fixed: int
    activations_per_sample: int

    def rows(self, fsdp: bool) -> dict[str, float]:
        n = self.processes if fsdp else 1
        rows = {"student parameters": FP32 * self.student_params / n, "gradients": FP32 * self.trainable_params / n,
                "optimizer (2 moments)": 2 * FP32 * self.trainable_params / n, "EMA": FP32 * self.student_params / n,
                "teacher": FP32 * self.teacher_params / n, "encoders + VAE (replicated)": FP32 * self.frozen_params}
        gather = BF16 if self.mixed_precision == "bf16" else FP32
        rows["FSDP gather buffers"] = (2 * gather + FP32) * self.largest_unit if fsdp and n > 1 else 0.0
        rows[f"activations (batch {self.batch_size})"] = self.activations_fixed + self.batch_size * \
            self.activations_per_sample  # fmt: skip
        return rows

    def total(self, fsdp: bool) -> float:
        return sum(self.rows(fsdp).values())

    def setup_peak(self) -> float:
        """Before sharding, every process loads the teacher and builds the student and its EMA whole."""
        return FP32 * (self.teacher_params + 2 * self.student_params + self.frozen_params)


def memory_plan(config: DistillConfig, processes: int, resolution: int | None = None) -> MemoryPlan:
    """The plan of a resolved config on `processes` processes (resolution: pixels, default data.resize_to)."""
    config = launcher_settings(config, os.environ)  # precision / micro-batches the recipe leaves to accelerate
    arch = architecture_of(config.teacher)
    resolution = resolution or config.data.resize_to or config.data.pad_to or arch.config.get("sample_size", 32) * \
        arch.downsample  # fmt: skip
    network = meta_denoiser(arch)
    P = sum(p.numel() for p in network.parameters())
    lora = lora_parameters(network, config.lora.rank, config.lora.target_modules) if config.lora.rank else 0
    dtype = torch.bfloat16 if config.train.mixed_precision == "bf16" else torch.float32
    fixed, per_sample = activations_per_sample(arch, resolution, dtype, config.train.activation_checkpointing)
    return MemoryPlan(teacher=config.teacher, processes=processes, batch_size=config.train.batch_size,
                      grad_accum_steps=config.train.grad_accum_steps, resolution=resolution,
                      mixed_precision=config.train.mixed_precision,
                      checkpointing=config.train.activation_checkpointing, student_params=P + lora,
                      trainable_params=lora if lora else P, teacher_params=0 if lora else P,
                      frozen_params=arch.frozen_params, largest_unit=max(unit_parameter_counts(network)),
                      activations_fixed=fixed, activations_per_sample=per_sample)  # fmt: skip


def format_plan(plan: MemoryPlan, gpu_memory_gb: float) -> str:
    """A table in GB (1e9 bytes), DDP next to FSDP, with the fit check against `gpu_memory_gb`."""
    lines = [f"per-GPU memory: {plan.teacher}, {plan.processes} process{'es' * (plan.processes > 1)}, batch "
             f"{plan.batch_size} per process x {plan.grad_accum_steps} micro-batches, {plan.resolution} px, "
             f"{plan.mixed_precision} precision, activation checkpointing {'on' if plan.checkpointing else 'off'}",
             f"{'':32}{'ddp':>10}{'fsdp':>10}"]  # fmt: skip
    ddp, fsdp = plan.rows(fsdp=False), plan.rows(fsdp=True)
    for name in ddp:
        lines.append(f"{name:32}{ddp[name] / 1e9:>10.2f}{fsdp[name] / 1e9:>10.2f}")
    lines.append(f"{'total':32}{plan.total(False) / 1e9:>10.2f}{plan.total(True) / 1e9:>10.2f}")
    fits = [("yes" if plan.total(f) <= HEADROOM * gpu_memory_gb * 1e9 else "no") for f in (False, True)]
    lines.append(f"{f'fits {gpu_memory_gb:g} GB (<= {HEADROOM:.0%})':32}{fits[0]:>10}{fits[1]:>10}")
    lines.append(f"activations: {plan.activations_per_sample / 1e9:.3f} GB per sample + "
                 f"{plan.activations_fixed / 1e9:.3f} GB fixed (saved by the gradient pass)")  # fmt: skip
    lines.append(f"set-up before sharding (teacher, student and EMA whole): {plan.setup_peak() / 1e9:.2f} GB")
    return "\n".join(lines)
