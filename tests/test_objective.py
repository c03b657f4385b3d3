"""The sCD objective: its JVP against two independent references, and identities of g and of the gradient."""

import pytest
import torch
from conftest import ToyNet, tiny_unet
from diffusers import DDPMScheduler
from torch.nn.attention import SDPBackend, sdpa_kernel

from scm_distill.families.module import ModuleTeacher
from scm_distill.families.unet2d import UNet2DTeacher
from scm_distill.families.vp import scheduler_config
from scm_distill.objective import SCDConfig, SCDLoss, adaptive_loss, consistency_tangent, normalize_tangent
from scm_distill.student import student_from_teacher
from scm_distill.trigflow import consistency_function, expand_as

SIGMA_D = 0.5


@pytest.fixture(scope="module")
def toy_models():
    """An eps teacher and its v student built on ToyNet (float64 throughout, for finite differences)."""
    scheduler = DDPMScheduler(prediction_type="epsilon")
    call = lambda net, x, time, cond: net(x, time)  # noqa: E731
    teacher = ModuleTeacher(ToyNet(seed=0).double(), prediction="epsilon", alphas_cumprod=scheduler.alphas_cumprod,
                            sample_shape=(1, 8, 8), call=call)  # fmt: skip
    student = student_from_teacher(teacher.model).double()
    with torch.no_grad():
        for p in student.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


@pytest.fixture(scope="module")
def models():
    """A tiny eps teacher and its v-prediction student, both float64 (with self-attention)."""
    scheduler = DDPMScheduler(prediction_type="epsilon")
    teacher = UNet2DTeacher(tiny_unet(0).double(), scheduler_config(scheduler), "tiny", None, SIGMA_D)
    student = student_from_teacher(teacher.model).double()
    with torch.no_grad():  # make the student differ from the teacher
        for p in student.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def point(seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)[:B]
    return x_t, t


def tangent_case(teacher, student, seed=0):
    x_t, t = point(seed)
    with torch.no_grad():
        dxdt = teacher.model.velocity(x_t, t)
    cs = torch.cos(t) * torch.sin(t)
    return x_t, t, expand_as(cs, x_t) * dxdt, cs


def test_jvp_through_unet2d_equals_reverse_mode_reference(models):
    """Our JVP (forward mode, JVP-safe attention) equals torch.autograd.functional.jvp (double backward)."""
    teacher, student = models
    x_t, t, v_x, v_t = tangent_case(teacher, student)
    F_minus, jvp_out = SCDLoss(teacher.model, SCDConfig(attention="math"))._jvp(student, x_t, t, {}, v_x, v_t)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
        F_ref, jvp_ref = torch.autograd.functional.jvp(lambda x, tt: student.F(x, tt), (x_t, t), (v_x, v_t))
    torch.testing.assert_close(F_minus, F_ref)
    torch.testing.assert_close(jvp_out, jvp_ref, rtol=1e-7, atol=1e-9)


def test_jvp_equals_central_finite_difference(toy_models):
    teacher, student = toy_models
    x_t, t, v_x, v_t = tangent_case(teacher, student, seed=1)
    _, jvp_out = SCDLoss(teacher.model, SCDConfig())._jvp(student, x_t, t, {}, v_x, v_t)
    h = 1e-6
    with torch.no_grad():
        fd = (student.F(x_t + h * v_x, t + h * v_t) - student.F(x_t - h * v_x, t - h * v_t)) / (2 * h)
    torch.testing.assert_close(jvp_out, fd, rtol=1e-6, atol=1e-7)


def test_finite_difference_option_is_close_to_the_exact_jvp(toy_models):
    teacher, student = toy_models
    x_t, t = point(1)
    v_x, v_t = torch.randn_like(x_t), torch.ones_like(t)
    exact = SCDLoss(teacher.model, SCDConfig())._jvp(student, x_t, t, {}, v_x, v_t)[1]
    fd = SCDLoss(teacher.model, SCDConfig(jvp="finite_difference", finite_difference_h=1e-5))._jvp(
        student, x_t, t, {}, v_x, v_t)[1]  # fmt: skip
    torch.testing.assert_close(fd, exact, rtol=1e-6, atol=1e-7)


def test_g_is_cos_t_times_the_total_derivative_of_f(toy_models):
    """Algorithm 1's g (r = 1) equals cos t * d/dt f(x_t, t) along the teacher's PF-ODE (finite difference)."""
    teacher, student = toy_models
    x_t, t = point(2)
    with torch.no_grad():
        dxdt = teacher.model.velocity(x_t, t)
    cs = torch.cos(t) * torch.sin(t)
    F_minus, cs_dFdt = SCDLoss(teacher.model, SCDConfig())._jvp(student, x_t, t, {}, expand_as(cs, x_t) * dxdt, cs)
    g = consistency_tangent(F_minus, cs_dFdt, dxdt, x_t, t, SIGMA_D, r=1.0)

    def f(x, tt):
        return consistency_function(x, student.F(x, tt), tt, SIGMA_D)

    h = 1e-6
    with torch.no_grad():
        df_dt = (f(x_t + h * dxdt, t + h) - f(x_t - h * dxdt, t - h)) / (2 * h)
    torch.testing.assert_close(g, expand_as(torch.cos(t), x_t) * df_dt, rtol=1e-6, atol=1e-7)


def test_tangent_normalization():
    g = torch.randn(4, 2, 3, 3, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 10.0, 1e3]).view(-1, 1, 1, 1)
    n = normalize_tangent(g, c=0.1)
    norms = n.flatten(1).norm(dim=1)
    expected = g.flatten(1).norm(dim=1) / (g.flatten(1).norm(dim=1) + 0.1)
    torch.testing.assert_close(norms, expected.to(norms.dtype))
    assert bool((norms < 1).all())


def test_loss_gradient_identity(models):
    """Since F^- equals F_theta in value, the sCD gradient is that of <-2 exp(-logvar) g / D, F_theta> (+ logvar).

    With the stop-gradient target y = F^- + g: d/dF ||F - y||^2 / D = 2 (F - y) / D = -2 g / D at F = F^-. So the
    network's parameter gradient equals the gradient of the linear surrogate, and the loss value is
    exp(-logvar) ||g||^2 / D + logvar.
    """
    teacher, student = models
    x0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss_fn = SCDLoss(teacher.model, SCDConfig(tangent_warmup_steps=0))
    with torch.no_grad():  # a non-zero logvar head, so the weighting is exercised
        student.logvar.linear.bias.fill_(0.3)
    loss, aux = loss_fn(student, student, x0, {}, step=5, generator=torch.Generator().manual_seed(4))
    params = list(student.network.parameters())
    grads = torch.autograd.grad(loss.sum(), params)

    # the same draw of (t, z), recomputed: g from the loss's own pieces
    from scm_distill.objective import noisy_batch

    t, x_t = noisy_batch(x0, loss_fn.config, teacher.model, torch.Generator().manual_seed(4))
    torch.testing.assert_close(t, aux["t"])
    with torch.no_grad():
        dxdt = teacher.model.velocity(x_t, t)
    cs = torch.cos(t) * torch.sin(t)
    F_minus, cs_dFdt = loss_fn._jvp(student, x_t, t, {}, expand_as(cs, x_t) * dxdt, cs)
    g = normalize_tangent(consistency_tangent(F_minus, cs_dFdt, dxdt, x_t, t, SIGMA_D, 1.0), 0.1)
    D = g[0].numel()
    weight = torch.exp(-aux["logvar"])
    torch.testing.assert_close(loss, weight * g.square().flatten(1).sum(1) / D + aux["logvar"], rtol=1e-6, atol=1e-9)
    surrogate = (-2 * expand_as(weight, g) * g / D * student.F(x_t, t)).sum()
    expected = torch.autograd.grad(surrogate, params)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)  # F_theta = F^- up to rounding


def test_adaptive_loss_minimiser_is_the_mse():
    """For fixed residual mse, exp(-lv) mse + lv is minimised at lv = log(mse) (so w = 1 / mse)."""
    F = torch.randn(2, 5, dtype=torch.float64)
    target = torch.zeros_like(F)
    mse = F.square().mean(1)
    lv = torch.log(mse)
    torch.testing.assert_close(adaptive_loss(F, target, lv), 1 + lv)
    assert bool((adaptive_loss(F, target, lv + 0.1) > 1 + lv).all())
