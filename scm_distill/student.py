"""The student: the teacher's network, initialised from its weights, read in a well-conditioned parameterization.

Why v-prediction for a VP teacher: the student's F must be accurate at every t. Read as eps-prediction, the
x0 estimate divides the network's error by alpha (~0.006 at the top of a linear schedule, sigma/alpha ~ 157), and
F inherits that; read as v-prediction, x0 = alpha x' - sigma v and F = (cos t x_t - x0) / (sigma_d sin t) carries
the error of v times 1/sqrt(cos^2 t + sigma_d^2 sin^2 t) <= 1/sigma_d, bounded at every t — the same conditioning
as the paper's TrigFlow-native networks (a TrigFlow network is an EDM-preconditioned v-prediction network).
Flow-matching networks are already v-like and keep their parameterization.

The learned log-variance head (adaptive weighting, arXiv 2410.11081v2 Sec. 4.2) is part of training only and
is never exported.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from .parameterization import Condition, NativeModel, Prediction
from .processes import VPProcess


# Student prediction type: v on a VP process (any teacher prediction), flow stays flow, others keep the teacher's.
def student_prediction(teacher: NativeModel) -> Prediction:
    if teacher.prediction == "flow":
        return "flow"
    return "v_prediction" if isinstance(teacher.process, VPProcess) else teacher.prediction


class LogvarHead(nn.Module):
    """logvar(t): Fourier features of c_noise = log(tan t) / 4 (EDM's noise conditioning; range about [-1.5, 1.5]
    over the trained t) -> linear, zero-initialised so training starts with unit weights. The frequencies are
    geometric from 0.5 to 16 rad per unit of c_noise: smooth in t, as a weighting over noise levels must be (a
    head that can follow noise in t gives a few t enormous weight)."""

    def __init__(self, channels: int = 128, min_freq: float = 0.5, max_freq: float = 16.0):
        super().__init__()
        half = channels // 2
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), half))
        self.register_buffer("freqs", freqs, persistent=False)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:  # t: [B] -> logvar: [B]
        c_noise = torch.log(torch.tan(t.float())) / 4
        angles = c_noise[:, None] * self.freqs[None, :]
        return self.linear(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)).squeeze(1)


class Student(nn.Module):
    """Trainable TrigFlow model plus the adaptive-weighting head; forward gives (F_theta, logvar)."""

    def __init__(self, model: NativeModel, logvar_channels: int = 128):
        super().__init__()
        self.model = model
        self.logvar = LogvarHead(logvar_channels)

    @property
    def network(self) -> nn.Module:
        return self.model.network

    def F(self, x_t: Tensor, t: Tensor, condition: Condition | None = None) -> Tensor:
        return self.model.F(x_t, t, condition)

    def forward(self, x_t: Tensor, t: Tensor, condition: Condition | None = None) -> tuple[Tensor, Tensor]:
        return self.model.F(x_t, t, condition), self.logvar(t)


def set_dropout(module: nn.Module, p: float) -> None:
    """Set every dropout probability in a network (sCD uses 0: the JVP and the gradient pass must agree)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def student_model(teacher: NativeModel, prediction: Prediction | None = None, dropout: float = 0.0) -> NativeModel:
    """A trainable copy of the teacher's network (same class, same weights), read as `prediction`."""
    network = copy.deepcopy(teacher.network).train().requires_grad_(True)
    set_dropout(network, dropout)
    prediction = prediction or student_prediction(teacher)
    return NativeModel(network, teacher.process, prediction, teacher.sigma_d, teacher.network_call)


def student_from_teacher(teacher: NativeModel, prediction: Prediction | None = None, dropout: float = 0.0,
                         logvar_channels: int = 128) -> Student:  # fmt: skip
    return Student(student_model(teacher, prediction, dropout), logvar_channels)
