"""Never export what is not finite: checks of the trained weights and of the student's samples.

The loop skips a step whose loss or gradient norm is non-finite (counted; too many in a row stop the run). A
step can still leave non-finite (or, with a huge learning rate, absurd) weights, so the parameters and buffers of
the student and of its EMA are checked every log step, before each checkpoint and before the export, and the EMA
student's 2-step samples before the export. Each failure stops the run with one sentence; nothing is exported.
"""

from __future__ import annotations

import math

import torch

from .errors import NonFiniteError

LOWER_LR_HINT = "resume from the last checkpoint with a lower learning rate (--set optim.lr=...)"


def largest_magnitude(module: torch.nn.Module) -> float:
    """max |w| over a module's floating-point parameters and buffers (NaN if any is NaN)."""
    tensors = [t.detach() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if not tensors:
        return 0.0
    return float(torch.nn.utils.get_total_norm(tensors, norm_type=math.inf))


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
