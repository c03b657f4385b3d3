"""DiT teachers on a tiny random DiTPipeline: the adapter against diffusers' own math (learned variance), CFG
against the null class, the zero-initialised guidance input, an end-to-end run whose export reloads without
scm_distill and reproduces the toolkit's sampler bit for bit, and bad inputs -> one sentence, exit 1, nothing
written."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tree
from tiny_pipelines import save_captioned_images, save_class_images, save_tiny, tiny_dit_pipeline

from scm_distill.cli import main
from scm_distill.config import resolve
from scm_distill.families import load_teacher
from scm_distill.families.dit import DiTTeacher
from scm_distill.generate import sampling_times
from scm_distill.trainer import distill
from scm_distill.trigflow import input_scale, vp_alpha_sigma

SIGMA_D = 0.5
TAU = torch.tensor([0, 10, 500, 999])
LABELS = [0, 2, 1]


def float64_teacher(prediction: str = "epsilon") -> DiTTeacher:
    pipe = tiny_dit_pipeline()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction)
    return DiTTeacher(pipe.to(torch.float64), "tiny", ".", SIGMA_D)


def to_trigflow(x_vp, teacher, tau):
    """The TrigFlow point (x_t, t) of a diffusers sample x_vp at integer timestep tau."""
    t = teacher.model.process.t_at(tau.double())
    alpha, _ = vp_alpha_sigma(t, SIGMA_D)
    return x_vp / input_scale(alpha, t).view(-1, 1, 1, 1), t


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_adapter_x0_equals_scheduler_pred_original_sample(prediction):
    """The first C of the 2C output channels, read by DDPMScheduler, give the adapter's x0 (DiTPipeline's split)."""
    from diffusers import DDPMScheduler

    teacher = float64_teacher(prediction)
    scheduler = DDPMScheduler.from_config(teacher.scheduler_config, prediction_type=prediction, clip_sample=False)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    labels = torch.tensor([3, 999, 0, 1000])  # 1000: the null class
    x_vp = torch.randn(len(TAU), 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        out = teacher.transformer(x_vp, timestep=TAU, class_labels=labels).sample
        assert out.shape[1] == 8
        expected = torch.stack([scheduler.step(out[i : i + 1, :4], int(TAU[i]), x_vp[i : i + 1]).pred_original_sample[0]
                                for i in range(len(TAU))])  # fmt: skip
        x0 = teacher.model.x0(*to_trigflow(x_vp, teacher, TAU), {"class_labels": labels})
    torch.testing.assert_close(x0, expected, rtol=1e-6, atol=1e-9)


def test_cfg_target_uses_the_null_class():
    teacher = float64_teacher()
    labels, s = torch.tensor([5, 7, 0]), torch.tensor([1.0, 1.7, 3.5])
    condition = teacher.condition(labels, s)
    assert condition["uncond"]["class_labels"].tolist() == [1000] * 3
    x_t = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0.3, 1.1, 1.5], dtype=torch.float64)
    with torch.no_grad():
        guided = teacher.model.velocity(x_t, t, condition)
        F_c = teacher.model.F(x_t, t, {"class_labels": labels})
        F_u = teacher.model.F(x_t, t, {"class_labels": torch.full((3,), 1000)})
    torch.testing.assert_close(guided, SIGMA_D * (F_u + s.double().view(-1, 1, 1, 1) * (F_c - F_u)), rtol=1e-9,
                               atol=1e-9)  # fmt: skip


def test_student_starts_equal_to_the_teacher_and_learns_its_guidance_input():
    teacher = float64_teacher()
    teacher.configure(resolve(cli={"teacher": "t", "output": "o", "guidance": {"embedding_dim": 16}}))
    student = teacher.student_model("epsilon", 0.0)
    embedder = student.network.guidance_embedder
    assert embedder.config.target_modules == ("transformer_blocks.0.norm1.emb", "transformer_blocks.1.norm1.emb")
    x_t = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    t = torch.tensor([0.4, 1.3], dtype=torch.float64)
    labels = torch.tensor([4, 9])
    condition = teacher.condition(labels, torch.tensor([1.0, 2.0]))
    with torch.no_grad():
        torch.testing.assert_close(student.F(x_t, t, condition), teacher.model.F(x_t, t, {"class_labels": labels}),
                                   rtol=0, atol=1e-12)  # fmt: skip
        embedder.linear.weight.normal_()  # a trained input changes the output, and only through the time embedding
        moved = student.F(x_t, t, condition)
    assert not torch.allclose(moved, teacher.model.F(x_t, t, {"class_labels": labels}))
    student.network.train()  # training mode must not drop labels (DiT's label dropout is off in the student)
    with torch.no_grad():
        torch.testing.assert_close(student.F(x_t, t, condition), moved, rtol=0, atol=0)


# --- end to end: 2 sCD steps -> export -> reload in a process that cannot import scm_distill ----------------------

LOAD_WITHOUT_SCM_DISTILL = """
import json, sys
sys.modules["scm_distill"] = None
import torch
from diffusers import DiffusionPipeline
export, labels, out_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
pipe = DiffusionPipeline.from_pretrained(export, trust_remote_code=True)
out = {"cls": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__}
for steps in (2, 1):
    kwargs = {} if steps == 2 else {"num_inference_steps": 1}  # the default call is the 2-step student
    for kind in ("latent", "pt"):
        out[f"{steps}-{kind}"] = pipe(labels, generator=torch.Generator().manual_seed(7), output_type=kind,
                                      **kwargs).images
pil = pipe(labels[:1], generator=torch.Generator().manual_seed(0)).images
assert len(pil) == 1 and pil[0].size == (32, 32), pil
torch.save(out, out_file)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    teacher_dir = save_tiny("dit", root / "teacher")
    config = resolve(cli={"teacher": str(teacher_dir), "output": str(root / "run"),
                          "data": {"spec": str(save_class_images(root / "data")),
                                   "latent_cache": str(root / "cache")},
                          "train": {"max_steps": 2, "convert_steps": 1, "batch_size": 4, "sample_every": 3,
                                    "checkpoint_every": 0},
                          "sampling": {"teacher_steps": 2, "grid_size": 2},
                          "guidance": {"embedding_dim": 32}})  # fmt: skip
    teacher = load_teacher(str(teacher_dir))
    result = distill(config, teacher=teacher)
    script, out_file = root / "load.py", root / "out.pt"
    script.write_text(LOAD_WITHOUT_SCM_DISTILL)
    done = subprocess.run([sys.executable, str(script), str(result.export_dir), json.dumps(LABELS), str(out_file)],
                          cwd=root, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return config, teacher, result, torch.load(out_file)


def toolkit_samples(teacher, model, config, steps: int):
    t_max, t_mid = sampling_times(config.sampling, model)
    condition = teacher.condition(torch.tensor(LABELS), config.guidance.scale)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the export's process: CPU kernels split their sums by thread count
    try:
        return teacher.consistency_samples(model, (len(LABELS), *teacher.sample_shape), steps, t_max, t_mid,
                                           torch.Generator().manual_seed(7), condition)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def test_export_reloads_without_scm_distill_and_equals_the_toolkit_sampler(run):
    config, teacher, result, loaded = run
    assert loaded["cls"] == "SCMDiTPipeline" and loaded["scheduler"] == "LCMScheduler"
    for steps in (2, 1):
        x0 = toolkit_samples(teacher, result.ema.model, config, steps)
        assert torch.equal(x0, loaded[f"{steps}-latent"]), f"{steps}-step latents differ"
        images = (teacher.decode(x0) / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(images, loaded[f"{steps}-pt"], rtol=0, atol=1e-5)


def test_export_contents_and_model_card(run):
    from diffusers import DiTTransformer2DModel, LCMScheduler

    config, teacher, result, _ = run
    folder = result.export_dir
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_scm_dit", "SCMDiTPipeline"]
    assert index["guidance_embedder"] == ["scm_guidance", "SCMGuidanceEmbedding"]
    assert index["timesteps"][0] > index["timesteps"][1] and index["guidance_scale"] == config.guidance.scale
    assert (folder / "guidance_embedder" / "scm_guidance.py").is_file()
    transformer = DiTTransformer2DModel.from_pretrained(folder / "transformer")
    for key, value in transformer.state_dict().items():
        assert torch.equal(value, result.ema.network.transformer.state_dict()[key]), key
    assert LCMScheduler.from_pretrained(folder / "scheduler").config.prediction_type == "v_prediction"
    assert result.ema.network.guidance_embedder.linear.weight.abs().sum() > 0  # trained away from zero
    card = (folder / "README.md").read_text()
    assert "trust_remote_code=True" in card and "class_labels=" in card
    assert not any(p.suffix in {".bin", ".pt", ".pth"} for p in folder.rglob("*"))


# --- bad input: one sentence, exit status 1, nothing written -----------------------------------------------------


def fails(capsys, *argv, match: str) -> None:
    capsys.readouterr()
    assert main(list(argv)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert errors == lines[-1:] and match in errors[0], lines


@pytest.fixture(scope="module")
def dit_teacher(tmp_path_factory):
    return save_tiny("dit", tmp_path_factory.mktemp("bad") / "teacher")


@pytest.mark.parametrize("case", ["no-labels", "labels-out-of-range", "wrong-size", "lora"])
def test_bad_input_is_one_sentence_and_writes_nothing(capsys, tmp_path, dit_teacher, case):
    data, teacher = tmp_path / "data", dit_teacher
    if case == "no-labels":
        save_captioned_images(data, n=2)
    else:
        save_class_images(data, classes=2, per_class=1, size=40 if case == "wrong-size" else 32)
    if case == "labels-out-of-range":  # a DiT of 1 class (label 0; its null class is 1)
        teacher = save_tiny("dit", tmp_path / "one-class", num_classes=1)
    match = {"no-labels": "is class-conditional but data",
             "labels-out-of-range": "has 2 classes but the teacher knows 1",
             "wrong-size": "is 40x40 but the teacher generates 32x32",
             "lora": "LoRA distillation is not supported for dit teachers"}[case]  # fmt: skip
    before = tree(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    sets = ["--set", "lora.rank=4"] if case == "lora" else []
    fails(capsys, "distill", "--teacher", str(teacher), "--data", str(data), "--output", str(out),
          "--max-steps", "1", "--set", f"data.latent_cache={cache}", *sets, match=match)  # fmt: skip
    assert tree(tmp_path) == before and not out.exists() and not cache.exists()
