"""export.call: one call for every export (unconditional, class labels, prompts), and sample / evaluate / bench on
text-to-image and class-conditional exports (tiny seeded pipelines, 2 sCD steps each, offline)."""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from tiny_pipelines import CAPTIONS, save_captioned_images, save_class_images, save_tiny

from scm_distill.config import resolve
from scm_distill.evaluation.bench import BenchSettings, bench
from scm_distill.evaluation.evaluate import EvalSettings, teacher_guidance, teacher_images
from scm_distill.export.call import PipelineSampler, conditioning_of, read_prompts
from scm_distill.export.load import load_export
from scm_distill.families import load_teacher
from scm_distill.generate import teacher_samples
from scm_distill.grids import to_uint8
from scm_distill.trainer import distill

PROMPTS = ("a red square", "two dots", "a cat")


def tiny_export(root, name: str, data, **cli) -> tuple:
    """(teacher folder, export folder) of a 2-step distillation of the tiny `name` pipeline."""
    teacher_dir = save_tiny(name, root / "teacher")
    config = resolve(cli={"teacher": str(teacher_dir), "output": str(root / "run"),
                          "data": {"spec": str(data), "latent_cache": str(root / "cache")},
                          "train": {"max_steps": 2, "convert_steps": 1, "batch_size": 4, "sample_every": 0,
                                    "checkpoint_every": 0},
                          "guidance": {"embedding_dim": 32}, **cli})  # fmt: skip
    return teacher_dir, distill(config).export_dir


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    guidance = {"embedding_dim": 32, "scale": 1.8}  # CFG distilled at 1.8, not the SD default 7.5: evaluate reads it
    return tiny_export(root, "sd", save_captioned_images(root / "data"), guidance=guidance, lora={"rank": 2})


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return tiny_export(root, "dit", save_class_images(root / "data"))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):  # the stock FluxPipeline + the folder's flow scheduler
    root = tmp_path_factory.mktemp("flux")
    return tiny_export(root, "flux", save_captioned_images(root / "data"), sampling={"sigma_max": 1.0e4})


def as_uint8(images: np.ndarray) -> torch.Tensor:
    from scm_distill.families.base import images_to_uint8

    return images_to_uint8(images)


def call(pipe, inputs: dict, steps: int, seed: int) -> torch.Tensor:
    """The one call of every export, as uint8."""
    return as_uint8(pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                         output_type="np").images)  # fmt: skip


def test_text_export_calls_are_the_one_call(sd):
    """Any step count is `pipe(prompts, num_inference_steps=n)`; prompts are taken in order from `start`, cycling."""
    _, export = sd
    sampler, pipe = PipelineSampler(export, PROMPTS), load_export(export)
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[0]]  # start 1, cycled
    for steps in (1, 2, 3):
        assert torch.equal(sampler(3, steps, seed=7, start=1), call(pipe, {"prompt": prompts}, steps, 7)), steps
    assert sampler.conditioning == "text" and conditioning_of(pipe) == "text"


def test_flux_export_is_fixed_by_its_generator_alone(flux):
    """FluxPipeline passes no generator to its scheduler; the export's scheduler seeds its re-noising from each
    sample's starting noise, so torch's global generator neither changes the samples nor is consumed."""
    _, export = flux
    sampler = PipelineSampler(export, PROMPTS, trust_remote_code=True)
    pipe = load_export(export, trust_remote_code=True)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    got = sampler(2, 2, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(5)
    again = call(pipe, {"prompt": list(PROMPTS[:2]), **sampler.description.call_kwargs}, 2, 7)
    assert torch.equal(got, again) and not torch.equal(sampler(2, 2, seed=8), got)


def test_class_export_labels_come_from_the_seed(dit):
    _, export = dit
    pipe = load_export(export, trust_remote_code=True)
    classes = pipe.transformer.config.num_embeds_ada_norm
    labels = torch.randint(0, classes, (2,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = call(pipe, {"class_labels": labels}, 2, 3)
    assert torch.equal(PipelineSampler(export, trust_remote_code=True)(2, 2, seed=3), expected)
    assert not torch.equal(PipelineSampler(export, trust_remote_code=True)(2, 2, seed=4), expected)


def test_unconditional_export_is_the_batch_call(tiny_run):
    pipe = load_export(tiny_run.export_dir)
    expected = call(pipe, {"batch_size": 3}, 2, 5)
    assert torch.equal(PipelineSampler(tiny_run.export_dir)(3, 2, seed=5), expected)


def test_prompt_errors_are_one_sentence(sd, tiny_run, tmp_path):
    with pytest.raises(ValueError, match="is a text-to-image pipeline; give prompts"):
        PipelineSampler(sd[1])
    with pytest.raises(ValueError, match="is a unconditional pipeline and takes no prompts"):
        PipelineSampler(tiny_run.export_dir, PROMPTS, trust_remote_code=True)
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="has no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "p.txt").write_text(" a cat \n\ntwo dots\n")
    assert read_prompts(tmp_path / "p.txt") == ("a cat", "two dots")


def test_sample_cli_on_a_text_export(sd, tmp_path):
    out = tmp_path / "grid.png"
    done = run_cli("sample", "--model", str(sd[1]), "--prompt", "a cat", "--num-images", "2", "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.stat().st_size > 0
    done = run_cli("sample", "--model", str(sd[1]), "--output", str(tmp_path / "none.png"))
    assert done.returncode == 1 and "give prompts" in done.stderr and not (tmp_path / "none.png").exists()


def test_teacher_images_use_the_prompts_in_the_students_order(sd, tiny_teacher):
    teacher = load_teacher(str(sd[0]))
    settings = EvalSettings(teacher_steps=(2,), num_samples=5, batch_size=3, seed=2, prompts=PROMPTS)
    got = teacher_images(teacher, 2, settings)
    chunks = []
    for start, n in ((0, 3), (3, 2)):  # chunk i: seed + start, prompts[start:start + n] cycled
        prompts = [PROMPTS[(start + i) % 3] for i in range(n)]
        x0 = teacher_samples(teacher.model, (n, *teacher.sample_shape), 2, torch.Generator().manual_seed(2 + start),
                             teacher.condition_for({"prompt": prompts}))  # fmt: skip
        chunks.append(to_uint8(teacher.decode(x0)))
    assert torch.equal(got, torch.cat(chunks))
    with pytest.raises(ValueError, match="is not a text-to-image model"):
        teacher_images(load_teacher(str(tiny_teacher)), 2, settings)


def test_teacher_guidance_scale_rules(sd, tiny_teacher, tiny_run):
    distilled, three = PipelineSampler(sd[1], PROMPTS).guidance_scale, EvalSettings(teacher_guidance_scale=3.0)
    assert teacher_guidance(load_teacher(str(sd[0])), distilled, EvalSettings()) == 1.8
    teacher = load_teacher(str(sd[0]))
    assert teacher_guidance(teacher, distilled, three) == 3.0 == teacher.default_scale
    with pytest.raises(ValueError, match="must be at least 1"):
        teacher_guidance(teacher, distilled, EvalSettings(teacher_guidance_scale=0.5))
    plain = load_teacher(str(tiny_teacher))
    unguided = PipelineSampler(tiny_run.export_dir, trust_remote_code=True).guidance_scale
    assert teacher_guidance(plain, unguided, EvalSettings()) is None
    with pytest.raises(ValueError, match="samples without guidance"):
        teacher_guidance(plain, unguided, EvalSettings(teacher_guidance_scale=2.0))


def test_evaluate_a_text_export_against_a_folder(sd, tmp_path):
    reference = save_captioned_images(tmp_path / "reference", n=12, captions=False, seed=1)
    (tmp_path / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    done = run_cli("evaluate", "--model", str(sd[1]), "--teacher", str(sd[0]), "--reference", str(reference),
                   "--steps", "1,2", "--teacher-steps", "2", "--num-samples", "6", "--prompts",
                   str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "eval"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["results"]) == {"student@1", "student@2", "teacher@2"} and metrics["num_prompts"] == 8
    assert metrics["teacher_guidance_scale"] == 1.8  # the scale of the export's own 2-step call
    assert all(r["num_generated"] == 6 and r["fid"] > 0 for r in metrics["results"].values())
    done = run_cli("evaluate", "--model", str(sd[1]), "--reference", str(reference), "--num-samples", "6",
                   "--output", str(tmp_path / "eval2"))  # fmt: skip
    assert done.returncode == 1 and "give prompts" in done.stderr and not (tmp_path / "eval2").exists()


def test_bench_a_text_export_times_the_pipelines_end_to_end(sd, tmp_path):
    settings = BenchSettings(teacher_steps=2, repeats=1, scaling=False)
    results = bench(sd[1], tmp_path / "bench", str(sd[0]), settings)
    row = results["sampling"]["end_to_end_batch1"]
    assert row["teacher_ms"] > 0 and row["student_2_step_ms"] > 0
    assert results["training"] == [] and "end-to-end sampling only" in results["note"]
    assert "network_batch1" not in results["sampling"]
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["note"] == results["note"]
    assert not (tmp_path / "bench" / "training.png").exists()  # nothing measured, nothing plotted
