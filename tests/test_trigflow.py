"""TrigFlow math: float64 round trips of every conversion, and the process maps (METHOD.md §1-§2, §5)."""

import math

import pytest
import torch

from scm_distill.parameterization import PREDICTION_FROM_X0, X0_FROM_PREDICTION
from scm_distill.processes import VPProcess
from scm_distill.trigflow import (
    F_from_x0,
    consistency_function,
    consistency_times,
    edm_alpha_sigma,
    flow_alpha_sigma,
    input_scale,
    sigma_edm_from_t,
    t_from_alpha_sigma,
    t_from_log_sigma,
    t_max_default,
    trigflow_noise,
    trigflow_velocity_target,
    vp_alpha_sigma,
)

SIGMA_D = 0.5
T = torch.linspace(0.01, 1.56, 17, dtype=torch.float64)
ALPHA_SIGMA = {"vp": vp_alpha_sigma, "flow": flow_alpha_sigma, "edm": edm_alpha_sigma}


def batch(seed=0, shape=(17, 2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("process", ALPHA_SIGMA)
def test_time_round_trip(process):
    alpha, sigma = ALPHA_SIGMA[process](T, SIGMA_D)
    torch.testing.assert_close(t_from_alpha_sigma(alpha, sigma, SIGMA_D), T, rtol=0, atol=1e-12)
    torch.testing.assert_close(sigma / alpha, sigma_edm_from_t(T, SIGMA_D), rtol=1e-12, atol=0)


@pytest.mark.parametrize("process", ALPHA_SIGMA)
def test_input_scale_maps_trigflow_to_native_process(process):
    """c(t) x_t = alpha x0 + sigma eps when x_t = cos t x0 + sin t sigma_d eps (Eq. 30)."""
    x0, eps = batch()
    alpha, sigma = ALPHA_SIGMA[process](T, SIGMA_D)
    x_t = trigflow_noise(x0, SIGMA_D * eps, T)
    native = input_scale(alpha, T).view(-1, 1, 1, 1) * x_t
    torch.testing.assert_close(native, alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps)


def test_vp_is_variance_preserving():
    alpha, sigma = vp_alpha_sigma(T, SIGMA_D)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(T))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample", "flow"])
def test_prediction_round_trip(prediction):
    """x0 -> native prediction -> x0 is the identity, on the process each prediction belongs to."""
    x0, eps = batch(1)
    alpha, sigma = (flow_alpha_sigma if prediction == "flow" else vp_alpha_sigma)(T, SIGMA_D)
    x = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    out = PREDICTION_FROM_X0[prediction](x, x0, alpha, sigma)
    torch.testing.assert_close(X0_FROM_PREDICTION[prediction](x, out, alpha, sigma), x0)


def test_native_predictions_of_true_noise():
    """The exact eps / v / flow of a noised sample are what each conversion returns."""
    x0, eps = batch(2)
    alpha, sigma = vp_alpha_sigma(T, SIGMA_D)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    x = a * x0 + s * eps
    torch.testing.assert_close(PREDICTION_FROM_X0["epsilon"](x, x0, alpha, sigma), eps)
    torch.testing.assert_close(PREDICTION_FROM_X0["v_prediction"](x, x0, alpha, sigma), a * eps - s * x0)
    fa, fs = flow_alpha_sigma(T, SIGMA_D)
    xf = fa.view(-1, 1, 1, 1) * x0 + fs.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(PREDICTION_FROM_X0["flow"](xf, x0, fa, fs), eps - x0)


def test_F_and_consistency_function_are_inverse():
    x_t, F = batch(3)
    x0 = consistency_function(x_t, F, T, SIGMA_D)
    torch.testing.assert_close(F_from_x0(x_t, x0, T, SIGMA_D), F)


def test_true_F_is_the_velocity_target_and_maps_to_x0():
    """With F = v_t / sigma_d (Eq. 4), f(x_t, t) returns x0 exactly, and dx_t/dt = sigma_d F."""
    x0, eps = batch(4)
    z = SIGMA_D * eps
    x_t = trigflow_noise(x0, z, T)
    F = trigflow_velocity_target(x0, z, T) / SIGMA_D
    torch.testing.assert_close(consistency_function(x_t, F, T, SIGMA_D), x0)
    h = 1e-6
    dxdt = (trigflow_noise(x0, z, T + h) - trigflow_noise(x0, z, T - h)) / (2 * h)
    torch.testing.assert_close(dxdt, SIGMA_D * F, rtol=1e-8, atol=1e-8)


def test_consistency_function_is_identity_at_zero():
    x_t, F = batch(5)
    torch.testing.assert_close(consistency_function(x_t, F, torch.zeros(17, dtype=torch.float64), SIGMA_D), x_t)


def test_proposal_and_sampling_times():
    tau = torch.tensor([-10.0, 0.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(t_from_log_sigma(tau, SIGMA_D), torch.atan(torch.exp(tau) / SIGMA_D))
    assert t_max_default(0.5) == pytest.approx(1.56455, abs=1e-5)  # METHOD.md §5
    assert consistency_times(1, 1.5, 1.1) == [1.5]
    assert consistency_times(2, 1.5, 1.1) == [1.5, 1.1]
    assert consistency_times(4, 1.6, 1.1) == pytest.approx([1.6, 1.2, 0.8, 0.4])
    with pytest.raises(ValueError, match="at least 1"):
        consistency_times(0, 1.5, 1.1)


def test_vp_process_interpolates_its_discrete_schedule():
    """network_time(t(tau)) = tau at every training timestep, and in between it is monotone."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    process = VPProcess(torch.cumprod(1 - betas, 0), SIGMA_D)
    tau = torch.tensor([0.0, 1.0, 17.0, 500.0, 998.0, 999.0], dtype=torch.float64)
    torch.testing.assert_close(process.network_time(process.t_at(tau)), tau, rtol=0, atol=1e-9)
    t = torch.linspace(process.t_min, process.t_max, 101, dtype=torch.float64)
    assert bool((process.network_time(t).diff() > 0).all())
    assert process.t_min == pytest.approx(math.atan(math.sqrt(1e-4 / (1 - 1e-4)) / SIGMA_D))
    assert process.time_grid(4) == pytest.approx(process.t_at(torch.tensor([999.0, 749.0, 499.0, 249.0])).tolist())


def test_vp_process_rejects_a_non_decreasing_schedule():
    with pytest.raises(ValueError, match="strictly decreasing"):
        VPProcess(torch.tensor([0.9, 0.9, 0.5]), SIGMA_D)


def test_teacher_grids_start_where_they_are_told_and_only_below_the_trained_range():
    """time_grid(n, t_start): the first time is t_start (the student's first time, so the grid's paired rows map
    the same x_T); at or above t_max it is the default grid. On the cosine schedule the default grid starts where
    alpha is 5e-5 (sigma 20,291: its last beta is capped at 0.999), which a DDIM step from eps cannot read."""
    from diffusers import DDPMScheduler

    from scm_distill.processes import FlowProcess, SigmaProcess

    cosine = VPProcess(DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod, SIGMA_D)
    t_start = math.atan(10.0 / SIGMA_D)
    sigma_sigmas = torch.exp(torch.linspace(math.log(0.002), math.log(80.0), 100, dtype=torch.float64))
    for process in (cosine, SigmaProcess(sigma_sigmas, SIGMA_D, "sigma"), FlowProcess(SIGMA_D, shift=3.0)):
        grid = process.time_grid(4, t_start)
        assert grid[0] == pytest.approx(t_start, abs=1e-9) and len(grid) == 4
        assert all(a > b for a, b in zip(grid, grid[1:], strict=False)) and grid[-1] > process.t_min
        assert process.time_grid(4, process.t_max) == process.time_grid(4)  # the default at the top of the range
    assert math.tan(cosine.time_grid(4)[0]) * SIGMA_D == pytest.approx(20291.3, rel=1e-3)
