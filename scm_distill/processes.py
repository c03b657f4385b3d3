"""Teacher processes x' = alpha x0 + sigma eps, each an exact reparameterization of TrigFlow time t.

arXiv 2410.11081v2 App. B.2 (Eq. 29-30). A process says, for TrigFlow time t: the native (alpha, sigma), the
time value its network takes (`network_time`), the TrigFlow range its network was trained on, and the time grid
of its own multi-step sampler. All maps are differentiable in t (the JVP differentiates through them).
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch
from torch import Tensor

from .errors import UserError
from .trigflow import edm_alpha_sigma, flow_alpha_sigma_stable, flow_time, t_from_flow_time, vp_alpha_sigma


class Process(Protocol):
    """What every teacher process provides; t is TrigFlow time [B]."""

    t_min: float  # smallest TrigFlow time the network was trained on
    t_max: float  # largest TrigFlow time the network was trained on

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]: ...

    def network_time(self, t: Tensor) -> Tensor: ...

    def time_grid(self, num_steps: int, t_start: float | None = None) -> list[float]: ...  # from t_start when
    # given (and below t_max), else from t_max


def _interp_index(value: Tensor, table: Tensor) -> Tensor:
    """Continuous index i such that table(i) = value, linear between entries of an increasing table."""
    hi = torch.searchsorted(table, value.detach().contiguous()).clamp(1, table.numel() - 1)
    lo = hi - 1
    w = (value - table[lo]) / (table[hi] - table[lo])
    return lo.to(value.dtype) + w


class VPProcess(torch.nn.Module):
    """Discrete variance-preserving schedule (DDPM family): alpha^2 = alphas_cumprod[tau], sigma^2 = 1 - alpha^2.

    Continuous teacher time tau(t) interpolates log sigma_edm(tau) = 0.5 log((1 - ab) / ab) linearly over tau
    (METHOD.md §2); (alpha, sigma) themselves are exact functions of t, so the map to TrigFlow stays affine-exact.
    """

    def __init__(self, alphas_cumprod: Tensor, sigma_d: float):
        super().__init__()
        ab = alphas_cumprod.double()
        log_sigma_edm = 0.5 * (torch.log1p(-ab) - torch.log(ab))  # [T], increasing in tau
        if not bool((log_sigma_edm[1:] > log_sigma_edm[:-1]).all()):
            raise UserError("alphas_cumprod must be strictly decreasing to define a continuous teacher time.")
        self.register_buffer("log_sigma_edm", log_sigma_edm, persistent=False)
        self.sigma_d = sigma_d
        self.num_train_timesteps = ab.numel()
        self.t_min = math.atan(math.exp(log_sigma_edm[0].item()) / sigma_d)
        self.t_max = math.atan(math.exp(log_sigma_edm[-1].item()) / sigma_d)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return vp_alpha_sigma(t, self.sigma_d)

    # tau(t): invert log sigma_edm(tau) = log(sigma_d tan t) by linear interpolation (METHOD.md §2).
    def network_time(self, t: Tensor) -> Tensor:
        log_sigma = torch.log(self.sigma_d * torch.tan(t))
        return _interp_index(log_sigma, self.log_sigma_edm.to(t.dtype))

    # TrigFlow time of a (possibly fractional) discrete timestep tau.
    def t_at(self, tau: Tensor) -> Tensor:
        i = tau.to(self.log_sigma_edm.device).clamp(0, self.num_train_timesteps - 1)
        lo = i.floor().long().clamp(max=self.num_train_timesteps - 2)
        log_sigma = torch.lerp(self.log_sigma_edm[lo], self.log_sigma_edm[lo + 1], (i - lo).double())
        return torch.atan(torch.exp(log_sigma) / self.sigma_d)

    # "trailing" spacing: the first step starts at the last training timestep (DDIM with few steps needs it); from
    # t_start, the same spacing over the timesteps [0, tau(t_start)] (fractional: the network time is continuous).
    def time_grid(self, num_steps: int, t_start: float | None = None) -> list[float]:
        T = self.num_train_timesteps
        if t_start is None or t_start >= self.t_max:
            tau = torch.round(torch.arange(T, 0, -T / num_steps, dtype=torch.float64)) - 1
            return self.t_at(tau).tolist()
        start = self.network_time(torch.tensor(t_start, dtype=torch.float64)).item() + 1
        return self.t_at(start * (1 - torch.arange(num_steps, dtype=torch.float64) / num_steps) - 1).tolist()


def clamp_time(t: Tensor, process: Process) -> Tensor:
    """Clamp TrigFlow times into the range the process's network was trained on."""
    return t.clamp(process.t_min, process.t_max)



TimeInput = Literal["index", "sigma", "c_noise"]


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> Tensor:
    """EDM's sampling grid sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho (Karras et al. Eq. 5)."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class SigmaProcess(torch.nn.Module):
    """Variance-exploding / EDM process x' = x0 + sigma eps (alpha = 1, sigma = sigma_d tan t).

    The network's time input is the noise level itself ("sigma"), EDM's c_noise = log(sigma) / 4 ("c_noise"),
    or the continuous index into an increasing table of discrete sigmas ("index").
    """

    def __init__(self, sigmas: Tensor, sigma_d: float, time_input: TimeInput = "sigma"):
        super().__init__()
        log_sigmas = torch.log(sigmas.double())
        if not bool((log_sigmas[1:] > log_sigmas[:-1]).all()):
            raise UserError("sigmas must be strictly increasing.")
        self.register_buffer("log_sigmas", log_sigmas, persistent=False)
        self.sigma_d, self.time_input = sigma_d, time_input
        self.t_min = math.atan(math.exp(log_sigmas[0].item()) / sigma_d)
        self.t_max = math.atan(math.exp(log_sigmas[-1].item()) / sigma_d)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return edm_alpha_sigma(t, self.sigma_d)

    def network_time(self, t: Tensor) -> Tensor:
        log_sigma = torch.log(self.sigma_d * torch.tan(t))
        if self.time_input == "index":
            return _interp_index(log_sigma, self.log_sigmas.to(t.dtype))
        return torch.exp(log_sigma) if self.time_input == "sigma" else log_sigma / 4

    # EDM's rho = 7 grid between the table's ends (from t_start's sigma when lower).
    def time_grid(self, num_steps: int, t_start: float | None = None) -> list[float]:
        lo, hi = math.exp(self.log_sigmas[0].item()), math.exp(self.log_sigmas[-1].item())
        if t_start is not None and t_start < self.t_max:
            hi = self.sigma_d * math.tan(t_start)
        return torch.atan(karras_sigmas(lo, hi, num_steps) / self.sigma_d).tolist()


class FlowProcess(torch.nn.Module):
    """Flow matching / rectified flow x_s = (1 - s) x0 + s eps (SD3, FLUX, Sana; METHOD.md §2), s in (0, 1].

    s = sigma_d sin t / (cos t + sigma_d sin t) exactly; the network's time input is `time_scale` * s (1000 for SD3
    and Sana's pipelines, 1 for FLUX, which scales by 1000 inside). The scheduler's `shift` only moves the
    inference grid (`time_grid`), not the map t <-> s. The trained range is [t(s_min), pi/2] (s = 1 is pure noise).
    """

    def __init__(self, sigma_d: float, time_scale: float = 1000.0, s_min: float = 1e-3, shift: float = 1.0):
        super().__init__()
        self.sigma_d, self.time_scale, self.shift = sigma_d, time_scale, shift
        self.t_min = math.atan2(s_min, (1 - s_min) * sigma_d)
        self.t_max = math.pi / 2

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return flow_alpha_sigma_stable(t, self.sigma_d)

    def flow_time(self, t: Tensor) -> Tensor:
        return flow_time(t, self.sigma_d)

    def network_time(self, t: Tensor) -> Tensor:
        return self.flow_time(t) * self.time_scale

    # TrigFlow time of a flow time s.
    def t_at(self, s: Tensor) -> Tensor:
        return t_from_flow_time(s, self.sigma_d)

    # The flow pipelines' grid: u evenly from 1 to 1/n, shifted s = shift u / (1 + (shift - 1) u); from t_start, u
    # evenly from the unshifted u_0 of s(t_start) (u = s / (shift - (shift - 1) s)) to u_0 / n.
    def time_grid(self, num_steps: int, t_start: float | None = None) -> list[float]:
        u0 = 1.0
        if t_start is not None and t_start < self.t_max:
            s0 = self.flow_time(torch.tensor(t_start, dtype=torch.float64)).item()
            u0 = s0 / (self.shift - (self.shift - 1) * s0)
        u = torch.linspace(u0, u0 / num_steps, num_steps, dtype=torch.float64)
        return self.t_at(self.shift * u / (1 + (self.shift - 1) * u)).tolist()
