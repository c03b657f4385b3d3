"""Teacher adapters against diffusers' own scheduler math, on tiny seeded models (float64)."""

import json

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from scm_distill.families import load_teacher
from scm_distill.families.module import ModuleTeacher
from scm_distill.families.unet2d import UNet2DTeacher
from scm_distill.families.vp import scheduler_config
from scm_distill.generate import teacher_samples
from scm_distill.sampling import sample_ddim
from scm_distill.trigflow import input_scale, vp_alpha_sigma

SIGMA_D = 0.5
TAU = torch.tensor([0, 10, 500, 999])


@pytest.fixture(scope="module")
def unet():
    return tiny_unet().double().eval()


def float64_schedule(scheduler):
    """Run diffusers' reference math in float64 (its alphas_cumprod are float32)."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def to_trigflow(x_vp, teacher, tau):
    """The TrigFlow point (x_t, t) of a diffusers sample x_vp at integer timestep tau."""
    t = teacher.model.process.t_at(tau.double())
    alpha, _ = vp_alpha_sigma(t, SIGMA_D)
    return x_vp / input_scale(alpha, t).view(-1, 1, 1, 1), t


def reference_x0(scheduler, unet, x_vp, tau):
    return torch.stack([scheduler.step(unet(x_vp[i : i + 1], tau[i]).sample, int(tau[i]), x_vp[i : i + 1])
                        .pred_original_sample[0] for i in range(len(tau))])  # fmt: skip


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_unet2d_x0_equals_scheduler_pred_original_sample(unet, prediction, beta_schedule):
    scheduler = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction, clip_sample=False)
    teacher = UNet2DTeacher(unet, scheduler_config(scheduler), "tiny", None, SIGMA_D)
    x_vp = torch.randn(len(TAU), 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = reference_x0(float64_schedule(scheduler), unet, x_vp, TAU)
    with torch.no_grad():
        x0 = teacher.model.x0(*to_trigflow(x_vp, teacher, TAU))
    # eps at the last squaredcos step divides by alpha ~ 1e-4: relative tolerance covers it
    torch.testing.assert_close(x0, expected, rtol=1e-6, atol=1e-9)


def test_trained_betas_and_other_vp_schedulers(unet):
    betas = torch.linspace(2e-4, 0.03, 500).tolist()
    scheduler = EulerDiscreteScheduler(trained_betas=betas, num_train_timesteps=500, prediction_type="v_prediction")
    teacher = UNet2DTeacher(unet, scheduler_config(scheduler), "tiny", None, SIGMA_D)
    ref = DDPMScheduler(trained_betas=betas, num_train_timesteps=500, prediction_type="v_prediction", clip_sample=False)
    tau = torch.tensor([0, 250, 499])
    x_vp = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        x0 = teacher.model.x0(*to_trigflow(x_vp, teacher, tau))
    torch.testing.assert_close(x0, reference_x0(float64_schedule(ref), unet, x_vp, tau), rtol=1e-6, atol=1e-9)


def test_module_adapter_equals_scheduler(unet):
    """A plain module (not a pipeline) on an alphas_cumprod schedule gives the same x0 as diffusers."""
    scheduler = DDPMScheduler(prediction_type="epsilon", clip_sample=False)
    teacher = ModuleTeacher(unet, prediction="epsilon", alphas_cumprod=scheduler.alphas_cumprod,
                            sample_shape=(1, 8, 8), call=lambda net, x, time, cond: net(x, time).sample)  # fmt: skip
    x_vp = torch.randn(len(TAU), 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        x0 = teacher.model.x0(*to_trigflow(x_vp, teacher, TAU))
    torch.testing.assert_close(x0, reference_x0(float64_schedule(scheduler), unet, x_vp, TAU), rtol=1e-6, atol=1e-9)


def test_module_adapter_on_a_sigma_schedule():
    """VE/EDM schedule x' = x0 + sigma eps with an eps network: x0 = x' - sigma eps."""
    sigmas = torch.exp(torch.linspace(-5, 4, 50, dtype=torch.float64))
    net = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    teacher = ModuleTeacher(net, prediction="epsilon", sigmas=sigmas, time_input="c_noise", sample_shape=(1, 4, 4),
                            call=lambda n, x, time, cond: n(x) * time.view(-1, 1, 1, 1))  # fmt: skip
    t = torch.tensor([0.2, 0.9, 1.5], dtype=torch.float64)
    x_t = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigma = SIGMA_D * torch.tan(t)
    x = x_t / torch.cos(t).view(-1, 1, 1, 1)
    expected = x - sigma.view(-1, 1, 1, 1) * net(x) * (torch.log(sigma) / 4).view(-1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(teacher.model.x0(x_t, t), expected)
    with pytest.raises(ValueError, match="exactly one"):
        ModuleTeacher(net, prediction="epsilon", sample_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="not supported"):
        ModuleTeacher(net, prediction="v_prediction", sigmas=sigmas, sample_shape=(1, 4, 4))


def test_ddim_in_trigflow_equals_diffusers_ddim(unet):
    """Our teacher sampler (DDIM in TrigFlow time, trailing grid) reproduces diffusers' DDIMScheduler loop."""
    scheduler = DDIMScheduler(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    teacher = UNet2DTeacher(unet, scheduler_config(scheduler), "tiny", None, SIGMA_D)
    float64_schedule(scheduler).set_timesteps(10)
    x_vp = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = x_vp.clone()
    with torch.no_grad():
        for tau in scheduler.timesteps:
            expected = scheduler.step(unet(expected, tau).sample, tau, expected).prev_sample
        grid = teacher.model.process.time_grid(10)
        x_t, _ = to_trigflow(x_vp, teacher, scheduler.timesteps[:1].expand(2))
        out = sample_ddim(lambda x, t: teacher.model.F(x, t), x_t, grid, SIGMA_D)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_teacher_samples_are_reproducible(tiny_teacher):
    teacher = load_teacher(str(tiny_teacher))
    a = teacher_samples(teacher.model, (2, 1, 8, 8), 3, torch.Generator().manual_seed(0))
    b = teacher_samples(teacher.model, (2, 1, 8, 8), 3, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 1, 8, 8)


def test_load_teacher_picks_the_family_and_errors_name_the_problem(tiny_teacher, tmp_path):
    assert isinstance(load_teacher(str(tiny_teacher)), UNet2DTeacher)
    with pytest.raises(ValueError, match="does not exist"):
        load_teacher(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="could not be fetched"):
        load_teacher("nobody/not-a-real-model-xyz")
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FancyPipeline",
                                                        "unet": ["diffusers", "FancyUNet"]}))  # fmt: skip
    with pytest.raises(ValueError, match="FancyPipeline pipeline, a family not supported yet; supported: unet2d-vp"):
        load_teacher(str(other))


def test_scheduler_configs_that_are_not_understood(tiny_teacher, tmp_path):
    import shutil

    for name, change, message in [
        ("unknown-class", {"_class_name": "FlowMatchEulerDiscreteScheduler"}, "not a DDPM-family scheduler"),
        ("bad-betas", {"beta_schedule": "zigzag"}, "not understood"),
        ("bad-prediction", {"prediction_type": "mu"}, "prediction type 'mu' is not supported"),
    ]:
        folder = tmp_path / name
        shutil.copytree(tiny_teacher, folder)
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
        with pytest.raises(ValueError, match=message):
            load_teacher(str(folder))
