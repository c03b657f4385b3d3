"""The sCM objective: continuous-time consistency distillation (sCD), arXiv 2410.11081v2 Algorithm 1.

Per sample, with theta^- = stopgrad(theta) (the same weights, not an EMA):
    t ~ proposal;  x_t = cos t x0 + sin t z;  dx_t/dt = sigma_d F_teacher(x_t, t)
    (F^-, cos t sin t dF^-/dt) = JVP of F_theta^- along (cos t sin t dx_t/dt, cos t sin t)       [no grad]
    g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d cos t sin t dF^-/dt)       [= cos t df/dt]
    g = g / (||g|| + c)                                                                             [Sec. 4.2]
    L = exp(-logvar(t)) / D ||F_theta(x_t, t) - F^- - g||^2 + logvar(t)                            [Eq. 8]
Here F takes x_t itself rather than x_t / sigma_d: the tangent of x_t is cos t sin t dx_t/dt, the same derivative
without the sigma_d double count of the paper's stated tangent (METHOD.md §3).

Each term is a small pure function; `SCDLoss` composes them and returns a per-sample loss plus an aux dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .attention import jvp
from .compiled_jvp import compiled_jvp_of_F
from .parameterization import Condition, NativeModel
from .processes import clamp_time
from .student import Student
from .trigflow import expand_as, t_from_log_sigma, trigflow_noise

JVPMode = Literal["exact", "finite_difference"]


# Proposal (Algorithm 1): tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d).
def sample_t(batch_size: int, P_mean: float, P_std: float, sigma_d: float, generator: torch.Generator) -> Tensor:
    tau = torch.randn(batch_size, generator=generator, dtype=torch.float64) * P_std + P_mean
    return t_from_log_sigma(tau, sigma_d)


# Tangent warmup r = min(1, step / H) (Sec. 4.2).
def tangent_warmup(step: int, H: int) -> float:
    return 1.0 if H <= 0 else min(1.0, step / H)


# g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d cos t sin t dF^-/dt) (Algorithm 1).
def consistency_tangent(F_minus: Tensor, cs_dFdt: Tensor, dxdt: Tensor, x_t: Tensor, t: Tensor,
                        sigma_d: float, r: float) -> Tensor:  # fmt: skip
    cos, sin = expand_as(torch.cos(t), x_t), expand_as(torch.sin(t), x_t)
    return -(cos**2) * (sigma_d * F_minus - dxdt) - r * (cos * sin * x_t + sigma_d * cs_dFdt)


# Tangent normalization g / (||g|| + c), per-sample L2 norm over all dimensions (Sec. 4.2).
def normalize_tangent(g: Tensor, c: float) -> Tensor:
    norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    return g / expand_as(norm + c, g)


# Adaptive weighting: exp(-logvar) / D ||F_theta - F^- - g||^2 + logvar (Eq. 8), per sample.
def adaptive_loss(F_theta: Tensor, target: Tensor, logvar: Tensor) -> Tensor:
    mse = (F_theta - target).float().square().flatten(1).mean(dim=1)
    return torch.exp(-logvar) * mse + logvar


# Central finite difference of F along (v_x, v_t): [F(x + h v_x, t + h v_t) - F(x - h v_x, t - h v_t)] / 2h.
def finite_difference_jvp(F: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, v_x: Tensor, v_t: Tensor,
                          h: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    plus = F(x + h * v_x, t + h * v_t)
    minus = F(x - h * v_x, t - h * v_t)
    return F(x, t), (plus - minus) / (2 * h)


@dataclass(frozen=True)
class SCDConfig:
    """Hyperparameters of the sCD objective (defaults: the paper's CIFAR-10 setting)."""

    P_mean: float = -1.0  # proposal mean of log sigma_edm (CIFAR-10 -1.0; ImageNet-512 latents -0.8)
    P_std: float = 1.4  # proposal std of log sigma_edm (CIFAR-10 1.4; ImageNet 1.6)
    tangent_warmup_steps: int = 10_000  # H in r = min(1, step / H)
    tangent_norm_c: float = 0.1  # c in g / (||g|| + c)
    adaptive_weighting: bool = True  # learned logvar(t); off = unit weights
    jvp: JVPMode = "exact"  # torch.func.jvp, or a central finite difference
    finite_difference_h: float = 1e-3  # step of the finite-difference JVP, in units of the tangent
    attention: Literal["auto", "fused", "math"] = "auto"  # attention path used only inside the JVP
    compile_jvp: bool = False  # torch.compile F and its JVP into one graph (exact JVP only; compiled_jvp.py)


def noisy_batch(x0: Tensor, cfg: SCDConfig, teacher: NativeModel, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Proposal times clamped to the teacher's range and x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2 I)."""
    t = clamp_time(sample_t(x0.shape[0], cfg.P_mean, cfg.P_std, teacher.sigma_d, generator), teacher.process)
    t = t.to(device=x0.device, dtype=x0.dtype)
    z = teacher.sigma_d * torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    return t, trigflow_noise(x0, z, t)


class SCDLoss:
    """sCD loss for a batch: call with (student, student_for_grad, x0, condition, step, generator).

    `student` is the unwrapped module (the JVP runs on it: through a DDP wrapper torch.func.jvp breaks on the
    second step); `student_for_grad` is the module to call for the gradient pass (the DDP wrapper, if any).
    """

    def __init__(self, teacher: NativeModel, config: SCDConfig):
        self.teacher = teacher
        self.config = config
        self.sigma_d = teacher.sigma_d

    def __call__(self, student: Student, student_for_grad: torch.nn.Module, x0: Tensor, condition: Condition,
                 step: int, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
        cfg, sigma_d = self.config, self.sigma_d
        t, x_t = noisy_batch(x0, cfg, self.teacher, generator)
        cs = torch.cos(t) * torch.sin(t)
        with torch.no_grad():
            dxdt = self.teacher.velocity(x_t, t, condition)
            F_minus, cs_dFdt = self._jvp(student, x_t, t, condition, expand_as(cs, x_t) * dxdt, cs)
        g = consistency_tangent(F_minus, cs_dFdt, dxdt, x_t, t, sigma_d, tangent_warmup(step, cfg.tangent_warmup_steps))
        g = normalize_tangent(g, cfg.tangent_norm_c)
        F_theta, logvar = student_for_grad(x_t, t, condition)
        if not cfg.adaptive_weighting:
            logvar = torch.zeros_like(logvar)
        loss = adaptive_loss(F_theta, F_minus + g, logvar)
        return loss, {"t": t.detach(), "logvar": logvar.detach(), "g_norm": g.flatten(1).norm(dim=1)}

    def _jvp(self, student: Student, x_t: Tensor, t: Tensor, condition: Condition, v_x: Tensor,
             v_t: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
        def F(x: Tensor, tt: Tensor) -> Tensor:
            return student.F(x, tt, condition)

        if self.config.jvp == "finite_difference":
            return finite_difference_jvp(F, x_t, t, v_x, v_t, self.config.finite_difference_h)
        if self.config.compile_jvp:
            return compiled_jvp_of_F(student, x_t, t, v_x, v_t, condition, attention=self.config.attention)
        return jvp(F, (x_t, t), (v_x, v_t), attention=self.config.attention)


class FRegressionLoss:
    """Warm start: regress the student's F onto the teacher's at proposal times (used before sCD when the student
    reads the teacher's network in another parameterization, e.g. an eps teacher as a v student)."""

    def __init__(self, teacher: NativeModel, config: SCDConfig):
        self.teacher = teacher
        self.config = config

    def __call__(self, student: Student, student_for_grad: torch.nn.Module, x0: Tensor, condition: Condition,
                 step: int, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
        cfg = self.config
        t, x_t = noisy_batch(x0, cfg, self.teacher, generator)
        with torch.no_grad():
            F_teacher = self.teacher.F(x_t, t, condition)
        F_theta, _ = student_for_grad(x_t, t, condition)
        return (F_theta - F_teacher).float().square().flatten(1).mean(dim=1), {"t": t.detach()}
