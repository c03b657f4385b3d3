"""Sampling speed: the teacher's own sampler against the student's 1/2-step sampler, same machine, same run."""

from __future__ import annotations

import torch

from ..generate import consistency_samples, teacher_samples
from ..parameterization import Condition, NativeModel
from .timing import measure


def sampling_speed(teacher: NativeModel, student: NativeModel, sample_shape: tuple[int, ...], teacher_steps: int,
                   t_max: float, t_mid: float, batch_size: int = 1, condition: Condition | None = None,
                   device: torch.device | None = None, repeats: int = 5,
                   student_steps: tuple[int, ...] = (1, 2)) -> dict:  # fmt: skip
    """Median latency (ms) of each sampler at one batch size, and the teacher/student ratio per step count."""
    device = device or torch.device("cpu")
    shape = (batch_size, *sample_shape)

    def teacher_run():
        teacher_samples(teacher, shape, teacher_steps, torch.Generator(device).manual_seed(0), condition, device)

    result = {"batch_size": batch_size, "teacher_steps": teacher_steps,
              "teacher_ms": measure(teacher_run, device, warmup=1, repeats=repeats).median_ms}  # fmt: skip
    for steps in student_steps:

        def student_run(steps=steps):
            consistency_samples(student, shape, steps, t_max, t_mid, torch.Generator(device).manual_seed(0),
                                condition, device)  # fmt: skip

        ms = measure(student_run, device, warmup=2, repeats=repeats).median_ms
        result[f"student_{steps}_step_ms"] = ms
        result[f"speedup_{steps}_step"] = result["teacher_ms"] / ms
    return result
