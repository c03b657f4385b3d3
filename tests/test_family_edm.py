"""EDM teachers (SDXL layout with EDMEulerScheduler / EDMDPMSolverMultistepScheduler, as Playground v2.5) on tiny
random pipelines: float64 round trips of the EDM conversions, the EDM sampler against the TrigFlow sampler, adapters
against the schedulers' own preconditioning, the student at init, end-to-end runs whose exports reload without
scm_distill and reproduce the toolkit's sampler bit for bit, and bad inputs -> one sentence, exit 1, nothing
written."""

import json

import pytest
import torch
from conftest import tree
from tiny_pipelines import TINY_PIPELINES, save_captioned_images, save_tiny

from scm_distill.cli import main
from scm_distill.config import resolve
from scm_distill.families.base import ExportInfo
from scm_distill.families.edm import EDMStableDiffusionXLTeacher, edm_process
from scm_distill.families.sd import unet_call
from scm_distill.sampling import sample_consistency
from scm_distill.trigflow import (
    consistency_function,
    edm_alpha_sigma,
    input_scale,
    sigma_edm_from_t,
    t_from_alpha_sigma,
    trigflow_noise,
)

SIGMA_D = 0.5
T = torch.linspace(0.01, 1.56, 17, dtype=torch.float64)
PROMPTS = ["a red square", "two dots", "a cat"]


def float64_teacher(name: str = "edm") -> EDMStableDiffusionXLTeacher:
    return EDMStableDiffusionXLTeacher(TINY_PIPELINES[name]().to(torch.float64), "tiny", ".", SIGMA_D)


# --- EDM conversions: float64 round trips ------------------------------------------------------------------------


def test_edm_time_and_input_round_trips():
    alpha, sigma = edm_alpha_sigma(T, SIGMA_D)
    torch.testing.assert_close(t_from_alpha_sigma(alpha, sigma, SIGMA_D), T, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(17, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    x_t = trigflow_noise(x0, SIGMA_D * eps, T)
    x_sigma = input_scale(alpha, T).view(-1, 1, 1, 1) * x_t  # = x_t / cos t
    torch.testing.assert_close(x_sigma, x0 + sigma_edm_from_t(T, SIGMA_D).view(-1, 1, 1, 1) * eps)


@pytest.mark.parametrize("name", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"])
def test_edm_v_preconditioning_is_the_trigflow_consistency_function(name):
    """With sigma_data = sigma_d, D = c_skip x_sigma + c_out F (EDM "v_prediction") is cos t x_t - sin t sigma_d F
    (Eq. 5), and EDM "epsilon" reads -F: an EDM-preconditioned network is a TrigFlow network."""
    import diffusers

    g = torch.Generator().manual_seed(1)
    x_t, F = (torch.randn(17, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    sigma = sigma_edm_from_t(T, SIGMA_D).view(-1, 1, 1, 1)
    x_sigma = x_t / torch.cos(T).view(-1, 1, 1, 1)
    expected = consistency_function(x_t, F, T, SIGMA_D)
    for prediction, out in (("v_prediction", F), ("epsilon", -F)):
        scheduler = getattr(diffusers, name)(sigma_data=SIGMA_D, prediction_type=prediction)
        torch.testing.assert_close(scheduler.precondition_outputs(x_sigma, out, sigma), expected)


def test_edm_scheduler_loop_is_the_trigflow_sampler():
    """The export's scheduler (SCMEDMScheduler) run as StableDiffusionXLPipeline runs it == the paper's TrigFlow
    sampler with its noise read in EDM coordinates."""
    teacher = float64_teacher()
    model, condition = teacher.model, teacher.encode({"prompt": PROMPTS})
    shape, times = (3, *teacher.sample_shape), [1.5, 1.1]
    scheduler = teacher.scheduler("sample", ExportInfo(sigma_data=SIGMA_D, t_max=times[0], t_mid=times[1]))
    torch.testing.assert_close(torch.atan(torch.tensor(scheduler.config.consistency_sigmas) / SIGMA_D),
                               torch.tensor(times), rtol=1e-6, atol=0)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scheduler.init_noise_sigma
    scheduler.set_timesteps(2)
    with torch.no_grad():
        for tau in scheduler.timesteps:
            out = unet_call(model.network, scheduler.scale_model_input(x, tau), tau, condition)
            x = scheduler.step(out, tau, x, generator=g).prev_sample
    g = torch.Generator().manual_seed(2)
    z = SIGMA_D * torch.randn(shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        trigflow = sample_consistency(lambda x, t: model.F(x, t, condition), z, times, SIGMA_D,
                                      lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype))  # fmt: skip
    torch.testing.assert_close(x, trigflow, rtol=1e-5, atol=1e-5)


# --- adapters ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["edm-euler", "edm"])
def test_adapter_x0_equals_the_schedulers(name):
    """At the scheduler's own sigmas and c_noise timesteps, the adapter's x0 is EDMEulerScheduler's
    pred_original_sample, resp. EDMDPMSolverMultistepScheduler's converted model output."""
    teacher = float64_teacher(name)
    scheduler = type(teacher.pipe.scheduler).from_config(teacher.pipe.scheduler.config)
    scheduler.set_timesteps(10)
    text = teacher.encode({"prompt": ["a cat"]})
    added = {"text_embeds": text["text_embeds"], "time_ids": text["time_ids"]}
    for i in (0, 4, 9):
        sigma, tau = scheduler.sigmas[i].double(), scheduler.timesteps[i]
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        with torch.no_grad():
            scheduler._step_index = i
            out = teacher.unet(scheduler.scale_model_input(x, tau), tau, encoder_hidden_states=text[
                "encoder_hidden_states"], added_cond_kwargs=added).sample  # fmt: skip
            if name == "edm-euler":
                scheduler._step_index = i
                expected = scheduler.step(out, tau, x).pred_original_sample
            else:
                expected = scheduler.convert_model_output(out, sample=x)
            t = torch.atan(sigma / SIGMA_D).view(1)
            x0 = teacher.model.x0(x * torch.cos(t), t, text)
        torch.testing.assert_close(x0, expected.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(teacher.model.process.network_time(t), sigma.view(1), rtol=1e-6, atol=0)


def test_cfg_target_and_the_student_at_init():
    teacher = float64_teacher()
    teacher.configure(resolve(cli={"teacher": "t", "output": "o", "guidance": {"embedding_dim": 16}}))
    assert teacher.default_scale == 5.0 and teacher.scales == (1.0, 5.0)  # StableDiffusionXLPipeline's default
    s = torch.tensor([1.0, 1.7, 3.5])
    condition = teacher.guided({"prompt": PROMPTS}, s)
    x_t = torch.randn(3, *teacher.sample_shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([0.3, 1.1, 1.5], dtype=torch.float64)
    student = teacher.student_model(None, 0.0)
    assert student.prediction == "sample" and student.network.config.time_cond_proj_dim == 16
    with torch.no_grad():
        F_c = teacher.model.F(x_t, t, teacher.encode({"prompt": PROMPTS}))
        F_u = teacher.model.F(x_t, t, condition["uncond"])
        torch.testing.assert_close(teacher.model.velocity(x_t, t, condition),
                                   SIGMA_D * (F_u + s.double().view(-1, 1, 1, 1) * (F_c - F_u)))  # fmt: skip
        torch.testing.assert_close(student.F(x_t, t, condition), F_c, rtol=0, atol=1e-12)
    assert edm_process(teacher.pipe.scheduler, SIGMA_D).t_max == pytest.approx(float(torch.atan(torch.tensor(160.0))))


def fails(capsys, *argv, match: str) -> None:
    capsys.readouterr()
    assert main(list(argv)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert errors == lines[-1:] and match in errors[0], lines


@pytest.mark.parametrize("case", ["no-prompts", "sample-prediction"])
def test_bad_input_is_one_sentence_and_writes_nothing(capsys, tmp_path, case):
    teacher = save_tiny("edm", tmp_path / "teacher")
    data = save_captioned_images(tmp_path / "data", n=2, captions=case != "no-prompts")
    if case == "sample-prediction":
        path = teacher / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "sample"}))
    match = {"no-prompts": "is text-conditioned but data",
             "sample-prediction": "EDM preconditioning is defined for 'epsilon' and 'v_prediction'"}[case]  # fmt: skip
    before = tree(tmp_path)
    out = tmp_path / "out"
    fails(capsys, "distill", "--teacher", str(teacher), "--data", str(data), "--output", str(out), "--max-steps", "1",
          match=match)  # fmt: skip
    assert tree(tmp_path) == before and not out.exists()
