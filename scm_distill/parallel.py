"""Sharding the training state across processes with FSDP2, activation checkpointing, and the launch checks.

`train.parallel: fsdp` calls `torch.distributed.fsdp.fully_shard` directly, per block: every element of a
network's `down_blocks` / `up_blocks` / `transformer_blocks` / `single_transformer_blocks` and its `mid_block`, at
any depth (innermost first, so an SD UNet's attention layers are units of their own inside a down block), then the
network itself (the root unit: embeddings, input and output layers). The student, its EMA copy and the frozen
teacher are sharded by the same plan, so the EMA update is a local lerp of matching shards; a LoRA student shares
the teacher's network, which is then sharded once. Gradients and optimizer state follow the parameters' shards.

Why fully_shard directly and not accelerate's FSDP plugin: the plugin wraps only the model passed to `prepare`, by
class names, and gathers state dicts its own way; sCD needs the same plan on three modules (student, EMA, teacher),
the JVP through the sharded student's forward (torch 2.14.1 supports torch.func.jvp through FSDP2 under no_grad)
and a full EMA gathered for the export. An accelerate config with `fsdp_version: 2` is accepted as a launcher (its
wrap settings are not read); FSDP1 and DeepSpeed are refused, since torch.func does not run through their flat or
partitioned parameters.

Mixed precision (`train.mixed_precision: bf16`) is bf16 autocast, as under DDP, plus FSDP2's MixedPrecisionPolicy on
the blocks (bf16 all-gathers, fp32 gradient reduction); the root unit keeps its parameters in their own dtype, so
time embeddings stay fp32 wherever a family keeps them so.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from .errors import UserError
from .student import Student

BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")  # each element a unit
BLOCK_MODULES = ("mid_block",)  # a unit of its own
# modules inside a block that the network also calls from outside it (a unit's parameters are gathered only inside
# its own forward): DiT's output layer reads transformer_blocks[0].norm1.emb
OWN_UNIT_CLASSES = ("CombinedTimestepLabelEmbeddings",)


def check_launcher(environ: Mapping[str, str], parallel: str) -> None:
    """Refuse accelerate launch configs whose sharding torch.func cannot run through (one-sentence errors)."""
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise UserError("DeepSpeed launches are not supported: torch.func.jvp does not run through ZeRO-3's "
                         "partitioned parameters; set train.parallel: fsdp and launch with "
                         "recipes/accelerate/fsdp2.yaml.")  # fmt: skip
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("accelerate's FSDP1 is not supported: torch.func.jvp does not run through its flat "
                         "parameters; use fsdp_version: 2 (recipes/accelerate/fsdp2.yaml).")  # fmt: skip
    if parallel != "fsdp":
        raise UserError("the accelerate config asks for FSDP2 but train.parallel is ddp; set train.parallel: fsdp "
                         "(the trainer shards the student, EMA and teacher itself).")  # fmt: skip


def launcher_settings(config, environ: Mapping[str, str]):
    """The config with mixed precision, gradient accumulation and the distributed type taken from `accelerate launch`
    / `accelerate config` (their environment variables) where the recipe leaves them unset (null); a recipe value
    that contradicts what accelerate was asked for is one sentence. accelerate's defaults ("no" precision, 1
    micro-batch), which it writes whether asked or not, are not requests and never conflict."""
    import dataclasses

    train, asked = config.train, environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if asked not in ("no", "bf16"):
        raise UserError(f"accelerate asks for {asked} mixed precision; sCD trains in bf16 or fp32 only (fp16 "
                        f"overflows the tangent's JVP), so launch with --mixed_precision bf16 or no.")  # fmt: skip
    precision = train.mixed_precision
    if precision is None:
        precision = asked
    elif asked != "no" and precision != asked:
        raise UserError(f"the recipe's train.mixed_precision is {precision} but accelerate was launched with "
                        f"--mixed_precision {asked}; remove one of them (a null train.mixed_precision takes "
                        f"accelerate's).")  # fmt: skip
    accum_text = environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    try:
        accum_asked = int(accum_text)
    except ValueError:
        raise UserError(f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS must be an integer, got '{accum_text}'.") from None
    accum = train.grad_accum_steps
    if accum is None:
        accum = accum_asked
    elif accum_asked != 1 and accum != accum_asked:
        raise UserError(f"the recipe's train.grad_accum_steps is {accum} but accelerate asks for {accum_asked} "
                        f"gradient accumulation steps; remove one of them.")  # fmt: skip
    fsdp = environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    parallel = train.parallel or ("fsdp" if fsdp else "ddp")
    train = dataclasses.replace(train, mixed_precision=precision, grad_accum_steps=accum, parallel=parallel)
    return dataclasses.replace(config, train=train)


def single_process_note(parallel: str, world: int) -> str | None:
    """What `parallel: fsdp` on one process does (there is nothing to shard), or None."""
    if parallel == "fsdp" and world == 1:
        return ("note: train.parallel fsdp on one process has nothing to shard, so it runs as one plain process; "
                "its checkpoints are sharded checkpoints that resume on any number of processes.")  # fmt: skip
    return None


# --- which modules become FSDP units ----------------------------------------------------------------------------


def shard_units(network: nn.Module) -> list[nn.Module]:
    """The block modules of a network that become their own FSDP unit, deepest first (fully_shard goes bottom-up)."""
    found = []
    for name, module in network.named_modules():
        parts = name.split(".")
        in_list = len(parts) >= 2 and parts[-2] in BLOCK_LISTS and parts[-1].isdigit()
        if in_list or parts[-1] in BLOCK_MODULES or type(module).__name__ in OWN_UNIT_CLASSES:
            found.append((len(parts), name, module))
    return [module for _, _, module in sorted(found, key=lambda item: -item[0])]


def unit_parameter_counts(network: nn.Module) -> list[int]:
    """Parameters each FSDP unit gathers at once: every block unit's own (not its sub-units'), then the root's."""
    units = shard_units(network)
    owner = {}
    for unit in [network, *reversed(units)]:  # outer units first; inner units overwrite their parameters
        for parameter in unit.parameters():
            owner[id(parameter)] = id(unit)
    counts = {id(unit): 0 for unit in [*units, network]}
    for parameter in network.parameters():
        counts[owner[id(parameter)]] += parameter.numel()
    return list(counts.values())


def policies(mixed_precision: str) -> tuple[MixedPrecisionPolicy, MixedPrecisionPolicy]:
    """(block policy, root policy): bf16 blocks gather bf16 and reduce fp32; the root keeps its dtypes."""
    if mixed_precision == "bf16":
        return (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
                MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False))  # fmt: skip
    return MixedPrecisionPolicy(), MixedPrecisionPolicy()


def shard_network(network: nn.Module, mesh, mixed_precision: str) -> nn.Module:
    """fully_shard every block unit, then the network as the root unit (in place). Every unit reshards after its
    forward, roots too: forwards without a backward (the JVP, the teacher, sample grids, a logvar output the
    conversion loss ignores) must leave the parameters sharded, or the EMA update would meet unsharded ones."""
    block, root = policies(mixed_precision)
    for unit in shard_units(network):
        fully_shard(unit, mesh=mesh, mp_policy=block, reshard_after_forward=True)
    fully_shard(network, mesh=mesh, mp_policy=root, reshard_after_forward=True)
    return network


def shard_student(student: Student, mesh, mixed_precision: str) -> Student:
    """Shard the network per block and the logvar head as a unit of its own; every parameter ends up sharded."""
    shard_network(student.network, mesh, mixed_precision)
    fully_shard(student.logvar, mesh=mesh, mp_policy=policies(mixed_precision)[1], reshard_after_forward=True)
    unsharded = [name for name, p in student.named_parameters() if not isinstance(p, DTensor)]
    if unsharded:
        raise UserError(f"train.parallel fsdp cannot shard parameters outside the student's network "
                                  f"and logvar head (e.g. '{unsharded[0]}').")  # fmt: skip
    return student


# --- the full module behind a sharded one -----------------------------------------------------------------------


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers live on the meta device (no memory): the shape to gather a
    sharded copy into. Taken before sharding; hooks and attributes are copied as they are."""
    memo = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


def gather_full(sharded: nn.Module, skeleton: nn.Module, main: bool) -> nn.Module | None:
    """The unsharded module on the CPU of the main process (None elsewhere). Collective: every process calls it;
    one parameter is gathered at a time. Buffers are not sharded by FSDP2 and are copied as they are."""
    full = skeleton.to_empty(device="cpu") if main else None
    with torch.no_grad():
        for name, parameter in sharded.named_parameters():
            value = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
            if full is not None:
                full.get_parameter(name).copy_(value)
        for name, buffer in sharded.named_buffers():
            if full is not None:
                full.get_buffer(name).copy_(buffer)
    return full


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm and return it (the same value on every process, sharded or not)."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm if max_norm is not None else math.inf)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


# --- activation checkpointing -----------------------------------------------------------------------------------


def non_reentrant(module: nn.Module, *args):
    """diffusers' checkpointing hook, pinned to non-reentrant checkpointing (reentrant fails with torch.func)."""
    return checkpoint(module.__call__, *args, use_reentrant=False)


def checkpointable_models(network: nn.Module) -> list[nn.Module]:
    return [m for m in network.modules() if getattr(m, "_supports_gradient_checkpointing", False)]


def check_activation_checkpointing(network: nn.Module) -> None:
    if not checkpointable_models(network):
        raise UserError(f"train.activation_checkpointing needs a diffusers model that supports gradient "
                         f"checkpointing; the {type(network).__name__} network does not.")  # fmt: skip


def enable_activation_checkpointing(network: nn.Module, func: Callable = non_reentrant) -> int:
    """Checkpoint the blocks of every diffusers model in the network. diffusers checkpoints only while grad is
    enabled, so the JVP pass (under no_grad) runs without it and only the gradient pass recomputes."""
    check_activation_checkpointing(network)
    models = checkpointable_models(network)
    for model in models:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=func)
    return len(models)


class Sharding:
    """The FSDP2 layout of one run: one mesh over all processes, the student, its EMA and the teacher sharded by the
    same plan, and the EMA's meta skeleton to gather the export into."""

    def __init__(self, device: torch.device, world: int, mixed_precision: str):
        self.mesh = init_device_mesh(device.type, (world,))
        self.mixed_precision = mixed_precision
        self.skeleton: nn.Module | None = None

    def shard(self, student: Student, ema_module: Student, teacher_network: nn.Module) -> None:
        """Shard in place; a LoRA student's network is the teacher's (adapters off), which is then sharded once."""
        self.skeleton = meta_skeleton(ema_module)
        shard_student(student, self.mesh, self.mixed_precision)
        shard_student(ema_module, self.mesh, self.mixed_precision)
        if teacher_network is not student.network:
            shard_network(teacher_network, self.mesh, self.mixed_precision)

    def full(self, ema_module: Student, main: bool) -> Student | None:
        """The whole EMA student on the main process's CPU (collective)."""
        return gather_full(ema_module, self.skeleton, main)
