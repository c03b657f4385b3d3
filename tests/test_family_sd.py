"""Stable Diffusion and SDXL teachers on tiny random pipelines: adapters against diffusers' own math, CFG, the
latent cache, end-to-end runs (full and LoRA) whose exports reload without scm_distill and reproduce the toolkit's
sampler, and every bad input -> one sentence, exit 1, nothing written."""

import json

import pytest
import torch
from conftest import tree
from tiny_pipelines import IMAGE_SIZE, save_captioned_images, save_tiny, tiny_sd_pipeline, tiny_sdxl_pipeline

from scm_distill.cli import main
from scm_distill.config import resolve
from scm_distill.families.latent import LatentData, LatentSpace, measure_sigma_data
from scm_distill.families.sd import StableDiffusionTeacher, StableDiffusionXLTeacher
from scm_distill.families.vp import lcm_original_steps, lcm_scheduler, lcm_timesteps
from scm_distill.guidance import guidance_embedding
from scm_distill.sampling import sample_consistency
from scm_distill.trainer import distill
from scm_distill.trigflow import input_scale, vp_alpha_sigma

SIGMA_D = 0.5
TAU = torch.tensor([0, 10, 500, 999])
PROMPTS = ["a red square", "two dots", "a cat"]
BUILDERS = {"sd": (tiny_sd_pipeline, StableDiffusionTeacher), "sdxl": (tiny_sdxl_pipeline, StableDiffusionXLTeacher)}


def float64_teacher(name: str, prediction: str = "epsilon") -> StableDiffusionTeacher:
    build, family = BUILDERS[name]
    pipe = build(prediction) if name == "sd" else build()
    return family(pipe.to(torch.float64), "tiny", ".", SIGMA_D)


def to_trigflow(x_vp, teacher, tau):
    """The TrigFlow point (x_t, t) of a diffusers sample x_vp at integer timestep tau."""
    t = teacher.model.process.t_at(tau.double())
    alpha, _ = vp_alpha_sigma(t, SIGMA_D)
    return x_vp / input_scale(alpha, t).view(-1, 1, 1, 1), t


def expand(condition: dict, n: int) -> dict:
    return {k: v.expand(n, *v.shape[1:]) for k, v in condition.items()}


@pytest.mark.parametrize("name, prediction", [("sd", "epsilon"), ("sd", "v_prediction"), ("sdxl", "epsilon")])
def test_adapter_x0_equals_scheduler_pred_original_sample(name, prediction):
    from diffusers import DDPMScheduler

    teacher = float64_teacher(name, prediction)
    scheduler = DDPMScheduler.from_config(teacher.scheduler_config, prediction_type=prediction, clip_sample=False)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    text = expand(teacher.encode({"prompt": ["a cat"]}), len(TAU))
    added = {"text_embeds": text["text_embeds"], "time_ids": text["time_ids"]} if name == "sdxl" else None
    x_vp = torch.randn(len(TAU), 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        expected = torch.stack([scheduler.step(teacher.unet(x_vp[i : i + 1], TAU[i],
                                                            encoder_hidden_states=text["encoder_hidden_states"][:1],
                                                            added_cond_kwargs=None if added is None else
                                                            {k: v[:1] for k, v in added.items()}).sample,
                                               int(TAU[i]), x_vp[i : i + 1]).pred_original_sample[0]
                                for i in range(len(TAU))])  # fmt: skip
        x0 = teacher.model.x0(*to_trigflow(x_vp, teacher, TAU), text)
    torch.testing.assert_close(x0, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_cfg_target_is_the_linear_combination(name):
    teacher = float64_teacher(name)
    teacher.negative_prompt = "noise" if name == "sd" else ""  # SDXL: the empty prompt is zeroed (force_zeros)
    s = torch.tensor([1.0, 1.7, 3.5])
    condition = teacher.guided({"prompt": PROMPTS}, s)
    x_t = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0.3, 1.1, 1.5], dtype=torch.float64)
    with torch.no_grad():
        guided = teacher.model.velocity(x_t, t, condition)
        F_c = teacher.model.F(x_t, t, teacher.encode({"prompt": PROMPTS}))
        F_u = teacher.model.F(x_t, t, condition["uncond"])
    expected = SIGMA_D * (F_u + s.double().view(-1, 1, 1, 1) * (F_c - F_u))
    torch.testing.assert_close(guided, expected, rtol=1e-9, atol=1e-9)
    if name == "sdxl":
        assert not condition["uncond"]["encoder_hidden_states"].any() and not condition["uncond"]["text_embeds"].any()
        assert condition["time_ids"].tolist()[0] == [IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]
    else:
        negative, _ = teacher.pipe.encode_prompt(["noise"], "cpu", 1, False)
        assert torch.equal(condition["uncond"]["encoder_hidden_states"][1], negative[0])


def test_guidance_embedding_is_the_one_stock_pipelines_feed():
    pipe = tiny_sd_pipeline()
    s = torch.tensor([1.0, 1.5, 2.25, 7.5])
    for dim in (8, 9, 256):
        assert torch.equal(guidance_embedding(s, dim), pipe.get_guidance_scale_embedding(s - 1, embedding_dim=dim))


@pytest.mark.parametrize("rank", [0, 4])
def test_students_start_equal_to_the_teacher(rank):
    teacher = float64_teacher("sd")
    teacher.configure(resolve(cli={"teacher": "t", "output": "o", "lora": {"rank": rank},
                                   "guidance": {"embedding_dim": 16, "s_max": 8.0}}))  # fmt: skip
    student = teacher.student_model("epsilon", 0.0)
    assert (student.network.config.time_cond_proj_dim == 16) == (rank == 0)
    trainable = [name for name, p in student.network.named_parameters() if p.requires_grad]
    assert all(".lora_" in name for name in trainable) if rank else len(trainable) > 100
    x_t = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    t = torch.tensor([0.4, 1.3], dtype=torch.float64)
    condition = teacher.guided({"prompt": PROMPTS[:2]}, torch.tensor([1.0, 2.0]))
    with torch.no_grad():
        torch.testing.assert_close(student.F(x_t, t, condition),
                                   teacher.model.F(x_t, t, teacher.encode({"prompt": PROMPTS[:2]})), rtol=0,
                                   atol=1e-12)  # fmt: skip


def test_the_native_lcm_sampler_is_the_trigflow_sampler():
    """The stock LCMScheduler loop (what SD pipelines run) == the paper's 2-step sampler at its grid's times, its
    starting noise read in TrigFlow: the VP consistency sampler is LCMScheduler's step (vp.py)."""
    from diffusers.utils.torch_utils import randn_tensor

    teacher = float64_teacher("sd", "v_prediction")
    model, condition = teacher.model, teacher.encode({"prompt": PROMPTS})
    shape, process = (3, 4, 16, 16), teacher.model.process
    K = lcm_original_steps(process, process.t_max, 1.1)
    scheduler = lcm_scheduler(teacher.scheduler_config, "v_prediction", K)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    generator = torch.Generator().manual_seed(2)
    x = randn_tensor(shape, generator=generator, dtype=torch.float64)
    scheduler.set_timesteps(2)
    with torch.no_grad():
        for tau in scheduler.timesteps:
            out = model.network_call(model.network, x, tau, condition)
            x = scheduler.step(out, tau, x, generator=generator, return_dict=False)[0]
    timesteps = lcm_timesteps(1000, K, 2)
    assert scheduler.timesteps.tolist() == timesteps
    times = process.t_at(torch.tensor(timesteps, dtype=torch.float64))
    generator = torch.Generator().manual_seed(2)
    alpha, _ = vp_alpha_sigma(times[0], SIGMA_D)
    z = torch.randn(shape, generator=generator, dtype=torch.float64) / input_scale(alpha, times[0])  # x_t = x' / c
    with torch.no_grad():
        trigflow = sample_consistency(lambda x, t: model.F(x, t, condition), z, times.tolist(), SIGMA_D,
                                      lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype))  # fmt: skip
    torch.testing.assert_close(x, trigflow, rtol=1e-6, atol=1e-6)


def test_the_lcm_grid_is_the_one_nearest_the_requested_times():
    teacher = float64_teacher("sd")
    process = teacher.model.process
    K = lcm_original_steps(process, 1.50, 1.10)
    best = process.t_at(torch.tensor(lcm_timesteps(1000, K, 2), dtype=torch.float64))
    for other in (2, 3, 50, 500, 999):
        times = process.t_at(torch.tensor(lcm_timesteps(1000, other, 2), dtype=torch.float64))
        assert ((best - torch.tensor([1.5, 1.1])) ** 2).sum() <= ((times - torch.tensor([1.5, 1.1])) ** 2).sum()


def test_latent_cache_runs_the_vae_once_per_image(tmp_path):
    from scm_distill.data import load_images

    images = load_images(str(save_captioned_images(tmp_path / "data", n=5)))
    space = LatentSpace(tiny_sd_pipeline().vae)
    calls = []
    encode = space.encode
    space.encode = lambda x: calls.append(len(x)) or encode(x)
    cached = LatentData(space, str(tmp_path / "cache"))
    sigma = cached.sigma_data(images, 3)
    batch = torch.stack([images[i]["image"] for i in (4, 0, 2)])
    first = cached.latents(batch)
    again = LatentData(space, str(tmp_path / "cache")).latents(batch)  # a new run: all from disk
    assert calls == [3, 2] and torch.equal(first, again)
    picked = torch.stack([images[i]["image"] for i in (0, 1, 3)])  # 3 evenly spaced of 5
    assert sigma == pytest.approx(float(measure_sigma_data(encode(picked))))
    torch.testing.assert_close(first, encode(batch))
    other = LatentSpace(tiny_sd_pipeline(seed=1).vae)
    assert other.fingerprint() != space.fingerprint()
    assert len(list((tmp_path / "cache").iterdir())) == 1


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_lora_run_with_latent_cache_resumes_exactly(tmp_path):
    teacher_dir, data = save_tiny("sd", tmp_path / "teacher"), save_captioned_images(tmp_path / "data")

    def config(output, steps):
        return resolve(cli={"teacher": str(teacher_dir), "output": str(output),
                            "data": {"spec": str(data), "latent_cache": str(tmp_path / "cache")},
                            "train": {"max_steps": steps, "convert_steps": 1, "batch_size": 4, "sample_every": 0,
                                      "checkpoint_every": 0, "log_every": 1},
                            "lora": {"rank": 2}})  # fmt: skip

    straight = distill(config(tmp_path / "straight", 3))
    distill(config(tmp_path / "resumed", 1))
    resumed = distill(config(tmp_path / "resumed", 3), resume="latest")
    assert len(losses(straight.run_dir)) == 4 and losses(resumed.run_dir) == losses(straight.run_dir)
    for key, value in straight.ema.state_dict().items():
        assert torch.equal(value, resumed.ema.state_dict()[key]), key


# --- bad input: one sentence, exit status 1, nothing written -----------------------------------------------------


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory):
    return save_tiny("sd", tmp_path_factory.mktemp("bad") / "teacher")


def fails(capsys, *argv, match: str) -> None:
    """Exit status 1 and one error line, the last on stderr (the data layer's `datasets` may draw a progress bar)."""
    capsys.readouterr()
    assert main(list(argv)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert errors == lines[-1:] and match in errors[0], lines


def fp16_only_teacher(folder):
    tiny_sd_pipeline().to(torch.float16).save_pretrained(folder, variant="fp16", safe_serialization=True)
    return folder


@pytest.mark.parametrize("case", ["no-captions", "odd-size", "grayscale", "guidance-below-1", "lora-rank", "fp16"])
def test_bad_input_is_one_sentence_and_writes_nothing(capsys, tmp_path, sd_teacher, case):
    teacher, data, sets = sd_teacher, tmp_path / "data", []
    match = {"no-captions": "has no captions", "odd-size": "need sizes divisible by 8",
             "grayscale": "has 1 channel(s) but the teacher's VAE encodes 3-channel images",
             "guidance-below-1": "guidance.s_min must be at least 1", "lora-rank": "lora.rank 64 is larger than",
             "fp16": "has only 16-bit unet weights, which are meant for GPUs"}[case]  # fmt: skip
    save_captioned_images(data, n=2, captions=case != "no-captions", size=28 if case == "odd-size" else IMAGE_SIZE)
    if case == "grayscale":
        from PIL import Image

        for png in data.glob("*.png"):
            Image.open(png).convert("L").save(png)
    sets = {"guidance-below-1": ["guidance.s_min=0.5"], "lora-rank": ["lora.rank=64"]}.get(case, [])
    if case == "fp16":
        teacher = fp16_only_teacher(tmp_path / "fp16")
    before = tree(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["distill", "--teacher", str(teacher), "--data", str(data), "--output", str(out), "--max-steps", "1",
            "--set", f"data.latent_cache={cache}", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    fails(capsys, *argv, match=match)
    assert tree(tmp_path) == before and not out.exists() and not cache.exists()
