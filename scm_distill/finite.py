"""Never export what is not finite: checks of the trained weights and of the student's samples.

The loop skips a step whose loss or gradient norm is non-finite (counted; too many in a row stop the run). A
step can still leave non-finite (or, with a huge learning rate, absurd) weights, so the parameters and buffers of
the student and of its EMA are checked every log step, before each checkpoint and before the export, and the EMA
student's 2-step samples before the export. Each failure stops the run with one sentence; nothing is exported.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .errors import NonFiniteError

LOWER_LR_HINT = "resume from the last checkpoint with a lower learning rate (--set optim.lr=...)"


def largest_magnitude(module: torch.nn.Module) -> float:
    """max |w| over a module's floating-point parameters and buffers (NaN if any is NaN); for a sharded module the
    maximum over every rank's shards (a collective: every rank calls it)."""
    tensors = [local(t.detach()) for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    tensors = [t for t in tensors if t.numel()]  # a rank's shard of a small tensor can be empty
    sharded = any(isinstance(t, DTensor) for t in (*module.parameters(), *module.buffers()))
    largest = torch.nn.utils.get_total_norm(tensors, norm_type=math.inf) if tensors else torch.zeros(())
    if sharded and dist.is_initialized():
        largest = largest.float().nan_to_num(nan=math.inf)  # all_reduce(MAX) does not propagate NaN
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return float(largest)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (the tensor itself otherwise)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_weights(modules: dict[str, torch.nn.Module], step: int) -> None:
    """Stop with one sentence when any module (e.g. {"student": ..., "EMA student": ...}) is not finite."""
    for name, module in modules.items():
        if not math.isfinite(largest_magnitude(module)):
            raise NonFiniteError(f"the {name}'s weights are not finite after step {step}, so nothing is exported; "
                                 f"{LOWER_LR_HINT}.")  # fmt: skip


def check_initial_weights(student: torch.nn.Module) -> None:
    """Before anything is written: a student copied from non-finite teacher weights cannot train."""
    if not math.isfinite(largest_magnitude(student)):
        raise NonFiniteError("the student's initial weights are not finite (they are copied from the teacher, whose "
                             "weights hold NaN or infinite values); check the teacher's weight files.")  # fmt: skip


def check_samples(samples: torch.Tensor, step: int) -> None:
    if not torch.isfinite(samples).all():
        raise NonFiniteError(f"the EMA student's 2-step samples are not finite after step {step}, so nothing is "
                             f"exported; {LOWER_LR_HINT}.")  # fmt: skip
