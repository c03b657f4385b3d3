"""TrigFlow math: the process, the consistency function, and conversions to other parameterizations.

Source: C. Lu, Y. Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
arXiv 2410.11081v2 (equation numbers are v2's); flow matching -> TrigFlow as in SANA-Sprint, arXiv 2503.09641.

TrigFlow: x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2]. A network F reads x_t / sigma_d and
gives the PF-ODE velocity dx_t/dt = sigma_d F. Every teacher process x' = alpha x0 + sigma eps (eps ~ N(0, I)) is
an exact affine reparameterization of it (App. B.2): sigma/alpha = sigma_d tan(t). Functions here are pure
tensor maps, broadcast over a leading batch dimension; `t` is [B] and is reshaped against x with `expand_as`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import UserError


def expand_as(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample scalar [B] so it broadcasts against x [B, ...]."""
    return t.reshape(t.shape + (1,) * (x.dim() - t.dim()))


# --- the TrigFlow process --------------------------------------------------------------------------------


# Forward process x_t = cos(t) x0 + sin(t) z (Sec. 3).
def trigflow_noise(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    t = expand_as(t, x0)
    return torch.cos(t) * x0 + torch.sin(t) * z


# Diffusion target v_t = cos(t) z - sin(t) x0 (Eq. 4).
def trigflow_velocity_target(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    t = expand_as(t, x0)
    return torch.cos(t) * z - torch.sin(t) * x0


# Consistency function f(x_t, t) = cos(t) x_t - sin(t) sigma_d F (Eq. 5); also the x0 estimate (Eq. 23).
def consistency_function(x_t: Tensor, F: Tensor, t: Tensor, sigma_d: float) -> Tensor:
    t = expand_as(t, x_t)
    return torch.cos(t) * x_t - torch.sin(t) * sigma_d * F


# Universal teacher conversion F = (cos(t) x_t - x0_hat) / (sigma_d sin(t)) (inverse of Eq. 5).
def F_from_x0(x_t: Tensor, x0_hat: Tensor, t: Tensor, sigma_d: float) -> Tensor:
    t = expand_as(t, x_t)
    return (torch.cos(t) * x_t - x0_hat) / (sigma_d * torch.sin(t))


# Proposal: tau ~ N(P_mean, P_std^2), t = arctan(exp(tau) / sigma_d) (Algorithm 1).
def t_from_log_sigma(tau: Tensor, sigma_d: float) -> Tensor:
    return torch.atan(torch.exp(tau) / sigma_d)


# --- teacher processes x' = alpha x0 + sigma eps (App. B.2) ----------------------------------------------


# t = arctan(sigma_edm / sigma_d) with sigma_edm = sigma / alpha (Eq. 29), written with atan2 for stability.
def t_from_alpha_sigma(alpha: Tensor, sigma: Tensor, sigma_d: float) -> Tensor:
    return torch.atan2(sigma, alpha * sigma_d)


# EDM noise level of TrigFlow time: sigma_edm = sigma_d tan(t).
def sigma_edm_from_t(t: Tensor, sigma_d: float) -> Tensor:
    return sigma_d * torch.tan(t)


# Variance-preserving (alpha, sigma) with alpha^2 + sigma^2 = 1 at TrigFlow time t.
def vp_alpha_sigma(t: Tensor, sigma_d: float) -> tuple[Tensor, Tensor]:
    norm = torch.sqrt(torch.cos(t) ** 2 + (sigma_d * torch.sin(t)) ** 2)
    return torch.cos(t) / norm, sigma_d * torch.sin(t) / norm


# Input scale x' = c(t) x_t of a process with the given alpha(t) (Eq. 30): c = alpha / cos(t).
def input_scale(alpha: Tensor, t: Tensor) -> Tensor:
    return alpha / torch.cos(t)


# Flow matching x_s = (1 - s) x0 + s eps: alpha = 1 - s, sigma = s, so s = sigma_d sin t / (cos t + sigma_d sin t).
def flow_alpha_sigma(t: Tensor, sigma_d: float) -> tuple[Tensor, Tensor]:
    s = sigma_d * torch.sin(t) / (torch.cos(t) + sigma_d * torch.sin(t))
    return 1 - s, s


# EDM x_sigma = x0 + sigma_edm eps: alpha = 1, sigma = sigma_d tan(t).
def edm_alpha_sigma(t: Tensor, sigma_d: float) -> tuple[Tensor, Tensor]:
    return torch.ones_like(t), sigma_edm_from_t(t, sigma_d)


# --- native predictions <-> x0 estimate, for x' = alpha x0 + sigma eps -------------------------------------


# eps-prediction: x0 = (x' - sigma eps) / alpha.
def x0_from_eps(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    alpha, sigma = expand_as(alpha, x), expand_as(sigma, x)
    return (x - sigma * eps) / alpha


def eps_from_x0(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    alpha, sigma = expand_as(alpha, x), expand_as(sigma, x)
    return (x - alpha * x0) / sigma


# v-prediction v = alpha eps - sigma x0 (VP, alpha^2 + sigma^2 = 1): x0 = alpha x' - sigma v.
def x0_from_v(x: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    alpha, sigma = expand_as(alpha, x), expand_as(sigma, x)
    return alpha * x - sigma * v


def v_from_x0(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    alpha, sigma = expand_as(alpha, x), expand_as(sigma, x)
    return (alpha * x - x0) / sigma


# Flow velocity u = eps - x0 on x_s = (1 - s) x0 + s eps: x0 = x_s - s u.
def x0_from_flow(x: Tensor, u: Tensor, s: Tensor) -> Tensor:
    return x - expand_as(s, x) * u


def flow_from_x0(x: Tensor, x0: Tensor, s: Tensor) -> Tensor:
    return (x - x0) / expand_as(s, x)


# --- sampling (Sec. 5.2) ---------------------------------------------------------------------------------

SIGMA_MAX = 80.0  # EDM's sigma_max; t_max = arctan(sigma_max / sigma_d) (Sec. 5.2)
T_MID = 1.1  # intermediate time of the paper's 2-step sampler (Sec. 5.2, all experiments)


def t_max_default(sigma_d: float) -> float:
    """t_max = arctan(80 / sigma_d), 1.56455 for sigma_d = 0.5 (Sec. 5.2)."""
    return math.atan(SIGMA_MAX / sigma_d)


def consistency_times(num_steps: int, t_max: float, t_mid: float) -> list[float]:
    """Times at which a consistency model is evaluated: [t_max] for 1 step, [t_max, t_mid] for 2 steps (Sec. 5.2),
    and for more steps an even grid in t from t_max towards 0, the rule of diffusers' SCMScheduler."""
    if num_steps < 1:
        raise UserError(f"num_steps must be at least 1, got {num_steps}.")
    if num_steps == 2:
        return [t_max, t_mid]
    return [t_max * (1 - i / num_steps) for i in range(num_steps)]


# --- flow matching and EDM times (App. B.2 with sigma_edm = s / (1 - s), resp. sigma_edm = sigma) ----------------


# Flow time s = sigma_edm / (1 + sigma_edm) = sigma_d sin t / (cos t + sigma_d sin t).
def flow_time(t: Tensor, sigma_d: float) -> Tensor:
    return sigma_d * torch.sin(t) / (torch.cos(t) + sigma_d * torch.sin(t))


# Inverse: t = arctan(s / ((1 - s) sigma_d)), written with atan2 so that s = 1 gives t = pi/2.
def t_from_flow_time(s: Tensor, sigma_d: float) -> Tensor:
    return torch.atan2(s, (1 - s) * sigma_d)


# Flow matching (alpha, sigma) = (1 - s, s) in the form without cancellation near s = 1:
# alpha = cos t / (cos t + sigma_d sin t), sigma = sigma_d sin t / (cos t + sigma_d sin t).
def flow_alpha_sigma_stable(t: Tensor, sigma_d: float) -> tuple[Tensor, Tensor]:
    norm = torch.cos(t) + sigma_d * torch.sin(t)
    return torch.cos(t) / norm, sigma_d * torch.sin(t) / norm
