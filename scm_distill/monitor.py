"""The collapse monitor: how far the EMA student's 2-step samples are from the teacher's on the same noise.

Loss and gradient norm do not show a collapse (issue 12: a student collapsed to pure noise between 200 and 500
sCD steps while both looked normal). sCD trains the student to follow the teacher's probability-flow ODE from the
noise it starts at (arXiv 2410.11081v2 Sec. 3-4), so on the same noise and inputs a good 2-step student lands near
the teacher's own sample and a collapsed one (noise, flat colour, a mode) far from it. The distance is paired, in
the images' own [0, 1] pixels:

    D = sqrt(mean((x_student - x_teacher)^2))   over the sample grid's images and pixels

Why this space and not Inception/EfficientNet features: it needs no extra network or weights (every family, the
`nn.Module` teacher included), it costs nothing beyond the sample grid (the grid already draws exactly these
samples; the teacher's are drawn once per run), and a paired distance on a few dozen images is far less noisy than
any unpaired Frechet distance on so few. D is 0 for a perfect student; for images in [0, 1] a student that outputs
noise or a flat colour is typically at 0.3-0.6.

Rule: a measurement *degrades* when D > `DEGRADE_RATIO` x the best D so far (or is not finite); the run warns once,
in one line, each time it enters that state. The best
measurement's checkpoint is kept in `checkpoints/best` (never pruned) for `--export best`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEGRADE_RATIO = 1.5  # D above 1.5x its best so far: the student is moving away from the teacher


def paired_distance(student: Tensor, teacher: Tensor) -> float:
    """RMS distance of paired images in [0, 1] (any layout, same shape) - D above."""
    return float(torch.sqrt(torch.mean((student.float() - teacher.float()) ** 2)))


def images01(uint8: Tensor) -> Tensor:
    """uint8 images -> floats in [0, 1]."""
    return uint8.float() / 255.0


def degraded(distance: float, best: float | None) -> bool:
    """The warning rule: D rose above DEGRADE_RATIO x the best D so far (or stopped being finite)."""
    if not math.isfinite(distance):
        return True
    return best is not None and distance > DEGRADE_RATIO * best


def warning_line(distance: float, best: float, best_step: int, step: int) -> str:
    return (f"collapse monitor: at step {step} the EMA student's 2-step samples are {distance:.4f} (RMS, [0, 1] "
            f"pixels) from the teacher's, over {DEGRADE_RATIO}x the best {best:.4f} at step {best_step}; the run "
            f"may be collapsing (checkpoints/best holds step {best_step}: export it with --export best).")  # fmt: skip
