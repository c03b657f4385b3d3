"""DiT teachers on a tiny random DiTPipeline: the adapter against diffusers' own math (learned variance), CFG
against the null class, the zero-initialised guidance input, an end-to-end run whose export reloads without
scm_distill and reproduces the toolkit's sampler bit for bit, and bad inputs -> one sentence, exit 1, nothing
written."""


import pytest
import torch
from conftest import tree
from tiny_pipelines import save_captioned_images, save_class_images, save_tiny, tiny_dit_pipeline

from scm_distill.cli import main
from scm_distill.config import resolve
from scm_distill.families.dit import DiTTeacher
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
    condition = teacher.guided({"class_labels": labels}, s)
    assert condition["uncond"]["class_labels"].tolist() == [1000] * 3
    x_t = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0.3, 1.1, 1.5], dtype=torch.float64)
    with torch.no_grad():
        guided = teacher.model.velocity(x_t, t, condition)
        F_c = teacher.model.F(x_t, t, {"class_labels": labels})
        F_u = teacher.model.F(x_t, t, {"class_labels": torch.full((3,), 1000)})
    torch.testing.assert_close(guided, SIGMA_D * (F_u + s.double().view(-1, 1, 1, 1) * (F_c - F_u)), rtol=1e-9,
                               atol=1e-9)  # fmt: skip


def test_a_teacher_of_fewer_classes_samples_only_the_labels_its_id2label_names(tmp_path):
    """A DiT trained on 10 classes keeps DiTPipeline's 1000-row label table (row 1000: the null class); labels past
    its id2label were never trained, so the run's sample grids and collapse monitor and the export's label range
    must stop at its classes (they drew 0..999: the monitor's teacher row was noise on the Fashion-MNIST DiT)."""
    import json

    from scm_distill.families import load_teacher

    folder = save_tiny("dit", tmp_path / "teacher")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": {"0": "a", "1": "b", "2": "c"}}))
    teacher = load_teacher(str(folder))
    assert (teacher.num_classes, teacher.null_class) == (3, 1000)
    drawn = teacher.sample_inputs(200, torch.Generator().manual_seed(0))["class_labels"]
    assert set(drawn) == {0, 1, 2}
    assert teacher.encode_negative()["class_labels"].tolist() == [1000]
    assert load_teacher(str(save_tiny("dit", tmp_path / "whole-table"))).num_classes == 1000  # no id2label


def test_student_starts_equal_to_the_teacher_and_learns_its_guidance_input():
    teacher = float64_teacher()
    teacher.configure(resolve(cli={"teacher": "t", "output": "o", "guidance": {"embedding_dim": 16}}))
    student = teacher.student_model("epsilon", 0.0)  # read as the teacher is (the run's student reads it as v)
    embedder = student.network.guidance_embedder
    assert embedder.config.target_modules == ("transformer_blocks.0.norm1.emb", "transformer_blocks.1.norm1.emb")
    x_t = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    t = torch.tensor([0.4, 1.3], dtype=torch.float64)
    labels = torch.tensor([4, 9])
    condition = teacher.guided({"class_labels": labels}, torch.tensor([1.0, 2.0]))
    with torch.no_grad():
        torch.testing.assert_close(student.F(x_t, t, condition), teacher.model.F(x_t, t, {"class_labels": labels}),
                                   rtol=0, atol=1e-12)  # fmt: skip
        embedder.linear.weight.normal_()  # a trained input changes the output, and only through the time embedding
        moved = student.F(x_t, t, condition)
    assert not torch.allclose(moved, teacher.model.F(x_t, t, {"class_labels": labels}))
    student.network.train()  # training mode must not drop labels (DiT's label dropout is off in the student)
    with torch.no_grad():
        torch.testing.assert_close(student.F(x_t, t, condition), moved, rtol=0, atol=0)


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
