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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import UserError
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


def timestep_frequencies(time_proj: nn.Module) -> Tensor:
    """Angular frequency (rad per unit of the network's time input) of each channel of a diffusers `Timesteps`
    embedding: channel i and i + half share frequency i (sin and cos, in either order); an odd last channel is zero
    padding (frequency 0)."""
    half = time_proj.num_channels // 2
    exponent = -math.log(10_000) * torch.arange(half, dtype=torch.float32) / (half - time_proj.downscale_freq_shift)
    freqs = time_proj.scale * torch.exp(exponent).repeat(2)
    return torch.cat([freqs, torch.zeros(time_proj.num_channels % 2)])


def low_pass_time_embedding(network: nn.Module, max_frequency: float) -> int:
    """Remove the time-embedding channels faster than `max_frequency` from a UNet: zero their columns in the first
    layer of `time_embedding` and zero the channels themselves in training (a forward hook), so those columns get no
    gradient and stay zero. The result is the same architecture with weights, so exports need nothing extra.

    Why: the sCD tangent carries cos t sin t dF/dt, and through a sinusoidal embedding of a 0-999 timestep the
    fastest channels turn ~1 rad per timestep (hundreds of rad per unit of TrigFlow t), fitted only at integer
    timesteps. Their derivative dominates the tangent and grows in training (the time-derivative instability of
    arXiv 2410.11081v2 Sec. 4.1, which the paper removes with a smooth time embedding); the conversion phase refits
    the student to the teacher without them. Returns the number of channels removed."""
    time_proj, embedding = getattr(network, "time_proj", None), getattr(network, "time_embedding", None)
    if not hasattr(time_proj, "num_channels") or not isinstance(getattr(embedding, "linear_1", None), nn.Linear):
        raise UserError(f"student.time_embedding_max_frequency needs a network with a sinusoidal `time_proj` and a "
                         f"`time_embedding.linear_1` (diffusers UNets); {type(network).__name__} has none.")
    keep = timestep_frequencies(time_proj) <= max_frequency
    linear = embedding.linear_1
    with torch.no_grad():
        linear.weight[:, ~keep.to(linear.weight.device)] = 0
    mask = keep.to(linear.weight.dtype)
    time_proj.register_forward_hook(lambda module, args, out: out * mask.to(out.device, out.dtype))
    return int((~keep).sum())


@dataclass(frozen=True)
class TimeFeatures:
    """Where a network that is not a diffusers model embeds its time input, for the low-pass of the time embedding.

    layer: name (as in `named_modules`) of the nn.Linear that reads the sinusoidal time features first.
    frequencies: [in_features] angular frequency of each input column of that layer, in rad per unit of the
        network's own time input (e.g. t = i / 1000 embedded as sin(1000 t w_k): 1000 w_k); 0 for columns that are
        not time features (they are always kept).
    """

    layer: str
    frequencies: Tensor


def low_pass_time_features(network: nn.Module, features: TimeFeatures, max_frequency: float) -> int:
    """Remove the time features faster than `max_frequency` (rad per unit of the network's own time input) from any
    network: zero their columns of `features.layer` and zero those inputs of it in training (a forward pre-hook),
    so the columns get no gradient and stay zero - the same cure as low_pass_time_embedding for diffusers UNets,
    whose 0-999 timestep input it is the special case of. Returns the number of columns removed."""
    try:
        linear = network.get_submodule(features.layer)
    except AttributeError:
        linear = None
    if not isinstance(linear, nn.Linear):
        raise UserError(f"the time features' layer '{features.layer}' is not an nn.Linear of "
                        f"{type(network).__name__}.")  # fmt: skip
    frequencies = torch.as_tensor(features.frequencies, dtype=torch.float32).reshape(-1)
    if frequencies.numel() != linear.in_features:
        raise UserError(f"the time features give {frequencies.numel()} frequencies but '{features.layer}' reads "
                        f"{linear.in_features} inputs.")  # fmt: skip
    keep = frequencies <= max_frequency
    with torch.no_grad():
        linear.weight[:, ~keep.to(linear.weight.device)] = 0
    mask = keep.to(linear.weight.dtype)
    linear.register_forward_pre_hook(lambda module, args: (args[0] * mask.to(args[0].device, args[0].dtype),
                                                           *args[1:]))  # fmt: skip
    return int((~keep).sum())


def student_model(teacher: NativeModel, prediction: Prediction | None = None, dropout: float = 0.0) -> NativeModel:
    """A trainable copy of the teacher's network (same class, same weights), read as `prediction`."""
    network = copy.deepcopy(teacher.network).train().requires_grad_(True)
    set_dropout(network, dropout)
    prediction = prediction or student_prediction(teacher)
    return NativeModel(network, teacher.process, prediction, teacher.sigma_d, teacher.network_call)


def student_from_teacher(teacher: NativeModel, prediction: Prediction | None = None, dropout: float = 0.0,
                         logvar_channels: int = 128) -> Student:  # fmt: skip
    return Student(student_model(teacher, prediction, dropout), logvar_channels)
