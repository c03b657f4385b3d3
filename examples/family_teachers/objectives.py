"""The families' native training objectives as small pure functions (no IO, no .item()).

Sources (equation numbers of the versions named):
- DDPM eps loss: Ho et al. 2020, arXiv 2006.11239v2, Eq. 14 (L_simple), x_tau = sqrt(ab) x0 + sqrt(1 - ab) eps (Eq. 4).
- Learned variance (DiT's "learned sigma"): Nichol & Dhariwal 2021, arXiv 2102.09672v1: posterior q(x_{t-1} | x_t,
  x0) (Eq. 10-12), Sigma_theta = exp(v log beta_t + (1 - v) log beta~_t) (Eq. 15), L_hybrid = L_simple + lambda L_vlb
  with a stop-gradient on the mean (Sec. 3.1); L_vlb is the KL (Eq. 5-6) in bits per dimension. DiT (Peebles & Xie
  2023, arXiv 2212.09748v2, Sec. 3.2) trains with this and lambda = 1 (its code rescales L_vlb by T / 1000 = 1).
- Rectified flow / flow matching as in SD3 (Esser et al. 2024, arXiv 2403.03206v1): x_s = (1 - s) x0 + s eps (Eq. 1
  with a_s = 1 - s, b_s = s), target u = eps - x0, logit-normal times s = sigmoid(m + std n) (Eq. 19), and the
  resolution shift s' = shift s / (1 + (shift - 1) s) (Eq. 23, alpha = shift) that the pipelines' schedulers apply.
- EDM: Karras et al. 2022, arXiv 2206.00364v2, Table 1: ln sigma ~ N(P_mean, P_std^2), loss weight
  lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 on ||D(x0 + sigma n) - x0||^2; the preconditioning
  itself is the stock EDMEulerScheduler's (families call its precondition_* methods, so training and sampling
  read the network identically).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per sample [B]."""
    return (a.float() - b.float()).square().flatten(1).mean(dim=1)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


# Forward process of DDPM (Eq. 4): x_tau = sqrt(ab) x0 + sqrt(1 - ab) eps.
def vp_noised(x0: Tensor, eps: Tensor, ab: Tensor) -> Tensor:
    ab = _bcast(ab, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


# Posterior q(x_{tau-1} | x_tau, x0) (Nichol & Dhariwal Eq. 10-12): mean and log of beta~ (the tau = 0 value is the
# tau = 1 value, as in their code: beta~_0 = 0 has no log).
def posterior(x0: Tensor, x_t: Tensor, tau: Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    ab = alphas_cumprod[tau]
    ab_prev = torch.where(tau > 0, alphas_cumprod[(tau - 1).clamp(min=0)], torch.ones_like(ab))
    beta = 1 - ab / ab_prev
    mean = _bcast(ab_prev.sqrt() * beta / (1 - ab), x0) * x0 + _bcast((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab),
                                                                      x0) * x_t  # fmt: skip
    return mean, posterior_log_variance(alphas_cumprod)[tau]


def posterior_log_variance(alphas_cumprod: Tensor) -> Tensor:
    """log beta~_tau [T], beta~_tau = (1 - ab_{tau-1}) / (1 - ab_tau) beta_tau (Eq. 10), beta~_0 := beta~_1."""
    ab_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    beta = 1 - alphas_cumprod / ab_prev
    tilde = (1 - ab_prev) / (1 - alphas_cumprod) * beta
    return torch.log(torch.cat([tilde[1:2], tilde[1:]]))


# Learned-range variance (Eq. 15): log Sigma = v log beta + (1 - v) log beta~, v = (raw + 1) / 2 for raw in [-1, 1].
def learned_log_variance(raw: Tensor, tau: Tensor, alphas_cumprod: Tensor) -> Tensor:
    ab_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    log_beta = torch.log(1 - alphas_cumprod / ab_prev)[tau]
    log_tilde = posterior_log_variance(alphas_cumprod)[tau]
    v = (raw + 1) / 2
    return v * _bcast(log_beta, raw) + (1 - v) * _bcast(log_tilde, raw)


# KL(N(m1, e^l1) || N(m2, e^l2)) per element (Eq. 5-6 terms), nats.
def normal_kl(m1: Tensor, l1: Tensor, m2: Tensor, l2: Tensor) -> Tensor:
    return 0.5 * (l2 - l1 + torch.exp(l1 - l2) + (m1 - m2).square() * torch.exp(-l2) - 1)


# -log N(x; m, e^l) per element, nats (the tau = 0 term of L_vlb for continuous latents).
def gaussian_nll(x: Tensor, m: Tensor, l: Tensor) -> Tensor:
    return 0.5 * (l + math.log(2 * math.pi) + (x - m).square() * torch.exp(-l))


def vlb_bits(eps_hat: Tensor, raw_var: Tensor, x0: Tensor, x_t: Tensor, tau: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """L_vlb per sample [B] in bits per dimension, the mean stop-gradiented (L_hybrid trains only the variance with
    it). The model's mean is the posterior mean at x0_hat = (x_t - sqrt(1 - ab) eps_hat) / sqrt(ab)."""
    ab = _bcast(alphas_cumprod[tau], x0)
    x0_hat = (x_t - (1 - ab).sqrt() * eps_hat.detach()) / ab.sqrt()
    true_mean, true_log_var = posterior(x0, x_t, tau, alphas_cumprod)
    model_mean, _ = posterior(x0_hat, x_t, tau, alphas_cumprod)
    model_log_var = learned_log_variance(raw_var, tau, alphas_cumprod)
    kl = normal_kl(true_mean, _bcast(true_log_var, x0).expand_as(x0), model_mean, model_log_var)
    nll = gaussian_nll(x0, model_mean, model_log_var)
    per_dim = torch.where(_bcast(tau == 0, x0), nll, kl)
    return per_dim.flatten(1).mean(dim=1) / math.log(2.0)


# SD3 Eq. 19: logit-normal flow times s = sigmoid(m + std n), n ~ N(0, 1).
def logit_normal_times(n: int, generator: torch.Generator, m: float = 0.0, std: float = 1.0) -> Tensor:
    return torch.sigmoid(m + std * torch.randn(n, generator=generator))


# SD3 Eq. 23 (the schedulers' `shift`): s' = shift s / (1 + (shift - 1) s).
def shift_times(s: Tensor, shift: float) -> Tensor:
    return shift * s / (1 + (shift - 1) * s)


# Rectified flow: x_s = (1 - s) x0 + s eps, velocity target u = eps - x0.
def flow_noised(x0: Tensor, eps: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    s = _bcast(s, x0)
    return (1 - s) * x0 + s * eps, eps - x0


# EDM Table 1: ln sigma ~ N(P_mean, P_std^2).
def edm_sigmas(n: int, generator: torch.Generator, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    return torch.exp(p_mean + p_std * torch.randn(n, generator=generator))


# EDM Table 1: lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2.
def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    return (sigma.square() + sigma_data**2) / (sigma * sigma_data).square()
