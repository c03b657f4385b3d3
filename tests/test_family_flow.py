"""Flow-matching teachers (SD3, FLUX dev and schnell layouts, Sana) on tiny random pipelines: float64 round trips of
the flow conversions, adapters against the schedulers' own x0, CFG and guidance inputs, FLUX's packing, end-to-end
runs whose exports reload without scm_distill and reproduce the toolkit's sampler bit for bit, and bad inputs ->
one sentence, exit 1, nothing written."""

import json

import pytest
import torch
from conftest import tree
from tiny_pipelines import TINY_PIPELINES, save_captioned_images, save_tiny, tiny_flux_pipeline

from scm_distill.cli import main
from scm_distill.config import resolve
from scm_distill.families.flux import FluxTeacher, image_ids, pack_latents, unpack_latents
from scm_distill.families.sana import SanaTeacher
from scm_distill.families.sd3 import StableDiffusion3Teacher
from scm_distill.parameterization import PREDICTION_FROM_X0, X0_FROM_PREDICTION
from scm_distill.processes import FlowProcess
from scm_distill.trigflow import (
    F_from_x0,
    consistency_function,
    flow_alpha_sigma,
    flow_alpha_sigma_stable,
    flow_time,
    input_scale,
    t_from_alpha_sigma,
    t_from_flow_time,
    trigflow_noise,
)

SIGMA_D = 0.5
T = torch.linspace(0.01, 1.56, 17, dtype=torch.float64)
PROMPTS = ["a red square", "two dots", "a cat"]
FAMILIES = {"sd3": StableDiffusion3Teacher, "flux": FluxTeacher, "flux-schnell": FluxTeacher, "sana": SanaTeacher}
# the network time each stock pipeline feeds for scheduler timestep t (= 1000 s)
PIPELINE_TIME = {"sd3": lambda teacher, t: t, "flux": lambda teacher, t: t / 1000,
                 "sana": lambda teacher, t: t * teacher.transformer.config.timestep_scale}


# --- the flow process: float64 round trips (METHOD.md §2) --------------------------------------------------------


def test_flow_time_round_trips():
    s = flow_time(T, SIGMA_D)
    torch.testing.assert_close(t_from_flow_time(s, SIGMA_D), T, rtol=0, atol=1e-12)
    torch.testing.assert_close(s / (1 - s), SIGMA_D * torch.tan(T), rtol=1e-12, atol=0)  # sigma_edm = s / (1 - s)
    alpha, sigma = flow_alpha_sigma_stable(T, SIGMA_D)
    torch.testing.assert_close(torch.stack([alpha, sigma]), torch.stack(flow_alpha_sigma(T, SIGMA_D)), rtol=1e-12,
                               atol=1e-15)  # fmt: skip
    torch.testing.assert_close(t_from_alpha_sigma(alpha, sigma, SIGMA_D), T, rtol=0, atol=1e-12)
    assert float(t_from_flow_time(torch.tensor(1.0, dtype=torch.float64), SIGMA_D)) == pytest.approx(torch.pi / 2)


def test_flow_reading_round_trips():
    """x_s = x_t / (cos t + sigma_d sin t) is (1 - s) x0 + s eps; x0 -> u -> x0 and x0 -> F -> f = x0 are identities."""
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(17, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    process = FlowProcess(SIGMA_D)
    alpha, sigma = process.alpha_sigma(T)
    x_t = trigflow_noise(x0, SIGMA_D * eps, T)
    x_s = input_scale(alpha, T).view(-1, 1, 1, 1) * x_t
    s = process.flow_time(T).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_s, (1 - s) * x0 + s * eps)
    torch.testing.assert_close(x_s, x_t / (torch.cos(T) + SIGMA_D * torch.sin(T)).view(-1, 1, 1, 1))
    u = PREDICTION_FROM_X0["flow"](x_s, x0, alpha, sigma)
    torch.testing.assert_close(u, eps - x0)
    torch.testing.assert_close(X0_FROM_PREDICTION["flow"](x_s, u, alpha, sigma), x0)
    torch.testing.assert_close(consistency_function(x_t, F_from_x0(x_t, x0, T, SIGMA_D), T, SIGMA_D), x0)
    torch.testing.assert_close(process.network_time(T), 1000 * process.flow_time(T))
    torch.testing.assert_close(process.t_at(process.flow_time(T)), T, rtol=0, atol=1e-12)


def test_flow_grid_is_the_flux_pipelines_shifted_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 1 / 8, 8).tolist())
    process = FlowProcess(SIGMA_D, shift=3.0)
    s = process.flow_time(torch.tensor(process.time_grid(8), dtype=torch.float64))
    torch.testing.assert_close(s.float(), scheduler.sigmas[:-1], rtol=1e-6, atol=1e-6)


# --- adapters ----------------------------------------------------------------------------------------------------


def float64_teacher(name: str):
    teacher = FAMILIES[name](TINY_PIPELINES[name]().to(torch.float64), "tiny", ".", SIGMA_D)
    teacher.resolution = (32, 32)  # the tiny pipelines' images (FLUX's default would be 1024)
    return teacher


def test_flux_packing_is_the_pipelines():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    packed = FluxPipeline._pack_latents(x, 2, 4, 6, 8)
    assert torch.equal(pack_latents(x), packed)
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    assert torch.equal(image_ids(6, 8, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu",
                                                                                                     torch.float32))


@pytest.mark.parametrize("name", ["sd3", "flux", "sana"])
def test_adapter_x0_equals_the_schedulers(name):
    """At the teacher scheduler's flow times s_i, with the network time the pipeline feeds for timestep 1000 s_i,
    the adapter's x0 is the x0 of an Euler step of FlowMatchEulerDiscreteScheduler from s_i to 0 (for Sana also
    DPM-Solver's flow x0 at s_i, its own scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    teacher = float64_teacher(name)
    scheduler = teacher.pipe.scheduler
    scheduler.set_timesteps(8, mu=0.5) if name == "flux" else scheduler.set_timesteps(8)
    condition = {**teacher.encode({"prompt": ["a cat"]}), "guidance": torch.full((1,), 2.0, dtype=torch.float64)}
    for i in (0, 3, 7):
        euler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        euler.set_timesteps(sigmas=[float(scheduler.sigmas[i])])
        s, t_sched = euler.sigmas[0].double(), euler.timesteps[:1]  # t_sched = 1000 s
        x_s = torch.randn(1, *teacher.sample_shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        with torch.no_grad():
            u = type(teacher).network_call(teacher.transformer, x_s, PIPELINE_TIME[name](teacher, t_sched), condition)
            expected = euler.step(u, euler.timesteps[0], x_s).prev_sample.double()  # x + (0 - s) u
            if name == "sana":
                scheduler._step_index = i
                torch.testing.assert_close(scheduler.convert_model_output(u, sample=x_s), x_s - s * u)
            t = teacher.model.process.t_at(s.view(1))
            x_t = x_s * (torch.cos(t) + teacher.model.sigma_d * torch.sin(t))  # x_s = x_t / (cos t + sigma_d sin t)
            x0 = teacher.model.x0(x_t, t, condition)
        torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)
        fed = PIPELINE_TIME[name](teacher, t_sched).double()
        torch.testing.assert_close(teacher.model.process.network_time(t), fed, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["sd3", "flux-schnell", "sana"])
def test_cfg_target_is_the_linear_combination(name):
    teacher = float64_teacher(name)
    s = torch.tensor([1.0, 1.7, 3.5])
    condition = teacher.guided({"prompt": PROMPTS}, s)
    x_t = torch.randn(3, *teacher.sample_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0.3, 1.1, 1.5], dtype=torch.float64)
    with torch.no_grad():
        guided = teacher.model.velocity(x_t, t, condition)
        F_c = teacher.model.F(x_t, t, teacher.encode({"prompt": PROMPTS}))
        F_u = teacher.model.F(x_t, t, {k: v for k, v in condition["uncond"].items() if k != "guidance"})
    torch.testing.assert_close(guided, SIGMA_D * (F_u + s.double().view(-1, 1, 1, 1) * (F_c - F_u)), rtol=1e-9,
                               atol=1e-9)  # fmt: skip


def test_guidance_distilled_flux_takes_s_itself_without_cfg():
    teacher = float64_teacher("flux")
    condition = teacher.guided({"prompt": PROMPTS}, torch.tensor([1.0, 3.5, 3.5]))
    assert "uncond" not in condition and teacher.native_guidance
    x_t = torch.randn(3, *teacher.sample_shape, dtype=torch.float64)
    t = torch.full((3,), 1.0, dtype=torch.float64)
    with torch.no_grad():
        F = teacher.model.F(x_t, t, condition)
    assert not torch.allclose(F[0], F[1]) and torch.allclose(F[1], teacher.model.F(x_t[1:2], t[:1], {
        k: v[1:2] for k, v in condition.items()})[0])  # fmt: skip


@pytest.mark.parametrize("name", ["sd3", "flux", "flux-schnell", "sana"])
def test_students_start_equal_to_the_teacher(name):
    teacher = float64_teacher(name)
    teacher.configure(resolve(cli={"teacher": "t", "output": "o", "guidance": {"embedding_dim": 16}}))
    student = teacher.student_model(None, 0.0)
    assert student.prediction == "flow"
    assert student.network.config.guidance_embeds if name.startswith("flux") else hasattr(student.network,
                                                                                          "guidance_embedder")
    x_t = torch.randn(2, *teacher.sample_shape, dtype=torch.float64)
    t = torch.tensor([0.4, 1.3], dtype=torch.float64)
    condition = teacher.guided({"prompt": PROMPTS[:2]}, torch.tensor([1.0, 2.0]))
    reference = condition if teacher.native_guidance else teacher.encode({"prompt": PROMPTS[:2]})
    with torch.no_grad():
        torch.testing.assert_close(student.F(x_t, t, condition), teacher.model.F(x_t, t, reference), rtol=0,
                                   atol=1e-12)  # fmt: skip


def fails(capsys, *argv, match: str) -> None:
    capsys.readouterr()
    assert main(list(argv)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert errors == lines[-1:] and match in errors[0], lines


@pytest.fixture(scope="module")
def flux_teacher(tmp_path_factory):
    return save_tiny("flux", tmp_path_factory.mktemp("bad") / "teacher")


@pytest.mark.parametrize("case", ["no-prompts", "packed-size", "bf16-on-cpu", "not-flow-scheduler"])
def test_bad_input_is_one_sentence_and_writes_nothing(capsys, tmp_path, flux_teacher, case):
    teacher, data = flux_teacher, tmp_path / "data"
    save_captioned_images(data, n=2, captions=case != "no-prompts", size=40 if case == "packed-size" else 32)
    if case == "bf16-on-cpu":
        teacher = tmp_path / "bf16"
        tiny_flux_pipeline().to(torch.bfloat16).save_pretrained(teacher, safe_serialization=True)
    if case == "not-flow-scheduler":
        import shutil

        teacher = tmp_path / "ddim"
        shutil.copytree(flux_teacher, teacher)
        from diffusers import DDIMScheduler

        DDIMScheduler().save_pretrained(teacher / "scheduler")
        index = json.loads((teacher / "model_index.json").read_text())
        (teacher / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DDIMScheduler"]}))
    match = {"no-prompts": "is text-conditioned but data", "packed-size": "is 40x40 but FLUX packs 2x2 latent patches",
             "bf16-on-cpu": "has only 16-bit transformer weights, which are meant for GPUs",
             "not-flow-scheduler": "'DDIMScheduler' is not a flow-matching scheduler"}[case]  # fmt: skip
    before = tree(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    fails(capsys, "distill", "--teacher", str(teacher), "--data", str(data), "--output", str(out), "--max-steps", "1",
          "--set", f"data.latent_cache={cache}", match=match)  # fmt: skip
    assert tree(tmp_path) == before and not out.exists() and not cache.exists()
