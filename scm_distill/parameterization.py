"""Read any diffusion network in TrigFlow: its process, its prediction type, and the F it implies.

arXiv 2410.11081v2 App. B.2: with x' = c(t) x_t the network's native input and x0_hat its data estimate,
F = (cos t x_t - x0_hat) / (sigma_d sin t). A teacher and a student are both a `NativeModel`: a network, the
call that feeds it, a process and a prediction type. The student only differs in being trained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .errors import UserError
from .processes import Process
from .trigflow import (
    F_from_x0,
    eps_from_x0,
    expand_as,
    input_scale,
    v_from_x0,
    x0_from_eps,
    x0_from_v,
)

Prediction = Literal["epsilon", "v_prediction", "sample", "flow"]
Condition = dict[str, Any]
# network_call(network, x_native [B, C, H, W], network_time [B], condition) -> raw network output
NetworkCall = Callable[[nn.Module, Tensor, Tensor, Condition], Tensor]


# x0 estimate from a native prediction of x' = alpha x0 + sigma eps (one entry per prediction type).
def _x0_from_flow(x: Tensor, u: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return x - expand_as(sigma, x) * u  # flow velocity u = eps - x0 on x_s = (1 - s) x0 + s eps, s = sigma


def _flow_from_x0(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x - x0) / expand_as(sigma, x)


X0_FROM_PREDICTION = {
    "epsilon": x0_from_eps,
    "v_prediction": x0_from_v,
    "sample": lambda x, out, alpha, sigma: out,
    "flow": _x0_from_flow,
}
PREDICTION_FROM_X0 = {
    "epsilon": eps_from_x0,
    "v_prediction": v_from_x0,
    "sample": lambda x, x0, alpha, sigma: x0,
    "flow": _flow_from_x0,
}


def check_prediction(prediction: str, supported: tuple[str, ...] = tuple(X0_FROM_PREDICTION)) -> Prediction:
    if prediction not in supported:
        raise UserError(f"prediction type '{prediction}' is not supported here; use one of {list(supported)}.")
    return prediction  # type: ignore[return-value]


class NativeModel(nn.Module):
    """A network in its native parameterization, read as a TrigFlow model F(x_t, t, condition).

    Args:
        network: the diffusion network (a diffusers model or any nn.Module).
        process: maps TrigFlow time to the network's (alpha, sigma) and time input.
        prediction: what the network outputs ("epsilon", "v_prediction", "sample" or "flow").
        sigma_d: TrigFlow's data standard deviation.
        network_call: feeds (x_native, network_time, condition) to the network and returns its raw output.
    """

    def __init__(
        self,
        network: nn.Module,
        process: Process,
        prediction: Prediction,
        sigma_d: float,
        network_call: NetworkCall,
    ):
        super().__init__()
        self.network = network
        self.process = process
        self.prediction = check_prediction(prediction)
        self.sigma_d = sigma_d
        self.network_call = network_call

    @property
    def t_range(self) -> tuple[float, float]:
        return self.process.t_min, self.process.t_max

    # x0 estimate: x' = c(t) x_t (Eq. 30), then the prediction type's own formula.
    def x0(self, x_t: Tensor, t: Tensor, condition: Condition | None = None) -> Tensor:
        alpha, sigma = self.process.alpha_sigma(t)
        x = x_t * expand_as(input_scale(alpha, t), x_t)  # x: [B, C, H, W] in the network's input space
        out = self.network_call(self.network, x, self.process.network_time(t), condition or {})
        return X0_FROM_PREDICTION[self.prediction](x, out.to(x_t.dtype), alpha, sigma)

    # TrigFlow network output F (inverse of Eq. 5).
    def F(self, x_t: Tensor, t: Tensor, condition: Condition | None = None) -> Tensor:
        return F_from_x0(x_t, self.x0(x_t, t, condition), t, self.sigma_d)

    # PF-ODE velocity dx_t/dt = sigma_d F (Eq. 3).
    def velocity(self, x_t: Tensor, t: Tensor, condition: Condition | None = None) -> Tensor:
        return self.sigma_d * self.F(x_t, t, condition)


def unet2d_call(network: nn.Module, x: Tensor, time: Tensor, condition: Condition) -> Tensor:
    """Feeds a diffusers UNet2DModel (optionally class-conditional)."""
    return network(x, time, class_labels=condition.get("class_labels")).sample


@torch.no_grad()
def freeze(module: nn.Module) -> nn.Module:
    """Put a teacher in eval mode without gradients."""
    module.eval().requires_grad_(False)
    return module
