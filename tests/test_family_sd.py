"""Stable Diffusion and SDXL teachers on tiny random pipelines: adapters against diffusers' own math, CFG, the
latent cache, end-to-end runs (full and LoRA) whose exports reload without scm_distill and reproduce the toolkit's
sampler, and every bad input -> one sentence, exit 1, nothing written."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tree
from tiny_pipelines import IMAGE_SIZE, save_captioned_images, save_tiny, tiny_sd_pipeline, tiny_sdxl_pipeline

from scm_distill.cli import main
from scm_distill.config import resolve
from scm_distill.families import load_teacher
from scm_distill.families.guidance import guidance_embedding
from scm_distill.families.latent import LatentData, LatentSpace, measure_sigma_data
from scm_distill.families.lcm import consistency_timesteps, lcm_consistency_samples, lcm_scheduler
from scm_distill.families.sd import StableDiffusionTeacher, StableDiffusionXLTeacher
from scm_distill.generate import sampling_times
from scm_distill.lora import merged_copy
from scm_distill.parameterization import NativeModel
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
    text = expand(teacher.text_condition(["a cat"]), len(TAU))
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
    condition = teacher.condition(PROMPTS, s)
    x_t = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0.3, 1.1, 1.5], dtype=torch.float64)
    with torch.no_grad():
        guided = teacher.model.velocity(x_t, t, condition)
        F_c = teacher.model.F(x_t, t, teacher.text_condition(PROMPTS))
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
                                   "guidance": {"embedding_dim": 16}}))  # fmt: skip
    student = teacher.student_model("epsilon", 0.0)
    assert (student.network.config.time_cond_proj_dim == 16) == (rank == 0)
    trainable = [name for name, p in student.network.named_parameters() if p.requires_grad]
    assert all(".lora_" in name for name in trainable) if rank else len(trainable) > 100
    x_t = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    t = torch.tensor([0.4, 1.3], dtype=torch.float64)
    condition = teacher.condition(PROMPTS[:2], torch.tensor([1.0, 2.0]))
    with torch.no_grad():
        torch.testing.assert_close(student.F(x_t, t, condition),
                                   teacher.model.F(x_t, t, teacher.text_condition(PROMPTS[:2])), rtol=0, atol=1e-12)


def test_the_native_lcm_sampler_is_the_trigflow_sampler():
    """LCMScheduler on snapped timesteps == the paper's 2-step sampler at those times, its noise read in TrigFlow."""
    teacher = float64_teacher("sd", "v_prediction")
    model, condition = teacher.model, teacher.text_condition(PROMPTS)
    shape, process = (3, 4, 16, 16), teacher.model.process
    timesteps = consistency_timesteps(process, 2, process.t_max, 1.1)
    scheduler = lcm_scheduler(teacher.scheduler_config, "v_prediction")
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    native = lcm_consistency_samples(model, shape, timesteps, scheduler, torch.Generator().manual_seed(2),
                                     condition, dtype=torch.float64)  # fmt: skip
    times = process.t_at(torch.tensor(timesteps, dtype=torch.float64))
    generator = torch.Generator().manual_seed(2)
    alpha, _ = vp_alpha_sigma(times[0], SIGMA_D)
    z = torch.randn(shape, generator=generator, dtype=torch.float64) / input_scale(alpha, times[0])  # x_t = x' / c
    with torch.no_grad():
        trigflow = sample_consistency(lambda x, t: model.F(x, t, condition), z, times.tolist(), SIGMA_D,
                                      lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype))  # fmt: skip
    torch.testing.assert_close(native, trigflow, rtol=1e-6, atol=1e-6)


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


# --- end to end: 2 sCD steps -> export -> reload in a process that cannot import scm_distill ----------------------

LOAD_WITHOUT_SCM_DISTILL = """
import json, sys
sys.modules["scm_distill"] = None
import torch
from diffusers import DiffusionPipeline, LCMScheduler
export, teacher, prompts, out_file = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
calls = json.load(open(f"{export}/scm_call.json"))
pipe = DiffusionPipeline.from_pretrained(export)
out = {"cls": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__}
for steps, call in calls.items():
    for kind in ("latent", "pt"):
        out[f"{steps}-{kind}"] = pipe(prompts, generator=torch.Generator().manual_seed(7), output_type=kind,
                                      **call).images
if teacher:
    pipe = DiffusionPipeline.from_pretrained(teacher)
    pipe.load_lora_weights(export)
    pipe.scheduler = LCMScheduler.from_pretrained(export, subfolder="scheduler")
    out["lora-latent"] = pipe(prompts, generator=torch.Generator().manual_seed(7), output_type="latent",
                              **calls["2_steps"]).images
torch.save(out, out_file)
"""


def run_config(teacher_dir, data_dir, output, rank: int):
    return resolve(cli={"teacher": str(teacher_dir), "output": str(output),
                        "data": {"spec": str(data_dir), "latent_cache": str(output.parent / "cache")},
                        "train": {"max_steps": 2, "convert_steps": 1, "batch_size": 4, "sample_every": 3,
                                  "checkpoint_every": 0},
                        "sampling": {"teacher_steps": 2, "grid_size": 2},
                        "guidance": {"embedding_dim": 32}, "lora": {"rank": rank}})  # fmt: skip


@pytest.fixture(scope="module", params=[("sd", 0), ("sd", 4), ("sdxl", 0), ("sdxl", 4)],
                ids=["sd-full", "sd-lora", "sdxl-full", "sdxl-lora"])  # fmt: skip
def run(request, tmp_path_factory):
    name, rank = request.param
    root = tmp_path_factory.mktemp(f"{name}-{rank}")
    teacher_dir = save_tiny(name, root / "teacher")
    config = run_config(teacher_dir, save_captioned_images(root / "data"), root / "run", rank)
    teacher = load_teacher(str(teacher_dir))
    result = distill(config, teacher=teacher)
    script, out_file = root / "load.py", root / "out.pt"
    script.write_text(LOAD_WITHOUT_SCM_DISTILL)
    done = subprocess.run([sys.executable, str(script), str(result.export_dir), str(teacher_dir) if rank else "",
                           json.dumps(PROMPTS), str(out_file)], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return name, rank, config, teacher, result, torch.load(out_file)


def toolkit_samples(teacher, model: NativeModel, config, steps: int, guidance_scale: float):
    t_max, t_mid = sampling_times(config.sampling, model)
    condition = teacher.condition(PROMPTS, guidance_scale)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the export's process: CPU kernels split their sums by thread count
    try:
        return teacher.consistency_samples(model, (len(PROMPTS), *teacher.sample_shape), steps, t_max, t_mid,
                                           torch.Generator().manual_seed(7), condition)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def test_export_reloads_without_scm_distill_and_equals_the_toolkit_sampler(run):
    """Full: the stock pipeline's call == teacher.consistency_samples on the EMA student (latents bit for bit).
    LoRA: the merged pipeline == the sampler on the merged network; the LoRA on the teacher == the EMA student."""
    name, rank, config, teacher, result, loaded = run
    assert loaded["cls"] == {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[name]
    assert loaded["scheduler"] == "LCMScheduler"
    calls = json.loads((result.export_dir / "scm_call.json").read_text())
    model = result.ema.model
    if rank:  # the merged pipeline holds W + BA: the toolkit samples with the same merged network
        model = NativeModel(merged_copy(model.network), model.process, model.prediction, model.sigma_d,
                            model.network_call)  # fmt: skip
    for steps, key in ((2, "2_steps"), (1, "1_step")):
        x0 = toolkit_samples(teacher, model, config, steps, calls[key]["guidance_scale"])
        assert torch.equal(x0, loaded[f"{key}-latent"]), f"{steps}-step latents differ"
        images = (teacher.decode(x0) / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(images, loaded[f"{key}-pt"], rtol=0, atol=1e-5)
    if rank:  # the LoRA on the original teacher (load_lora_weights) is the unmerged EMA student, bit for bit
        x0 = toolkit_samples(teacher, result.ema.model, config, 2, calls["2_steps"]["guidance_scale"])
        assert torch.equal(x0, loaded["lora-latent"])
        torch.testing.assert_close(loaded["lora-latent"], loaded["2_steps-latent"], rtol=0, atol=1e-4)  # ~ merged


def test_export_contents_and_model_card(run):
    name, rank, config, teacher, result, _ = run
    from diffusers import LCMScheduler, UNet2DConditionModel

    folder = result.export_dir
    calls = json.loads((folder / "scm_call.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert unet.config.time_cond_proj_dim == (None if rank else 32)
    assert not any("lora" in key for key in unet.state_dict())
    scheduler = LCMScheduler.from_pretrained(folder / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction" and calls["2_steps"]["timesteps"][0] == 999
    assert calls["2_steps"]["guidance_scale"] == (1.0 if rank else config.guidance.scale)
    if rank:  # the adapters trained (lora_B starts at zero) and nothing else did
        from safetensors.torch import load_file

        lora = load_file(folder / "pytorch_lora_weights.safetensors")
        assert all(key.startswith("unet.") for key in lora) and any(v.abs().sum() > 0 for k, v in lora.items()
                                                                     if "lora_B" in k)  # fmt: skip
        assert not any(p.requires_grad for n, p in result.student.named_parameters() if "lora_" not in n
                       and n.startswith("model."))  # fmt: skip
    else:  # the guidance input trained away from its zero initialisation
        assert unet.time_embedding.cond_proj.weight.abs().sum() > 0
        assert not (folder / "pytorch_lora_weights.safetensors").exists()
    card = (folder / "README.md").read_text()
    assert f"timesteps={calls['2_steps']['timesteps']}" in card and "pipeline_tag: text-to-image" in card
    assert ("pipe.load_lora_weights(" in card) == bool(rank)
    assert not any(p.suffix in {".bin", ".pt", ".pth"} for p in folder.rglob("*"))
    assert 0 < teacher.model.sigma_d < 10 and list((result.run_dir / "samples").glob("*.png"))


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
             "fp16": "has only fp16 weights, which are meant for GPUs"}[case]  # fmt: skip
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
