"""evaluate and bench end to end on a tiny export (offline, small N), and their bad inputs."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from scm_distill.evaluation.bench import BenchSettings, bench
from scm_distill.evaluation.cost import dit_case, sd_unet_case, training_cost
from scm_distill.evaluation.evaluate import EvalSettings, evaluate, reference_images


def save_pngs(folder, images) -> None:
    """Each uint8 [H, W] array as folder/000.png, 001.png, ... (the folder is created)."""
    folder.mkdir(parents=True)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


SMALL = EvalSettings(steps=(1, 2), teacher_steps=(2,), num_samples=12, batch_size=6, trust_remote_code=True)


def test_evaluate_writes_metrics_report_curve_and_grids(tiny_run, tiny_teacher, tmp_path):
    metrics = evaluate(tiny_run.export_dir, "digits", tmp_path / "eval", str(tiny_teacher), SMALL)
    assert set(metrics["results"]) == {"student@1", "student@2", "teacher@2"}
    assert metrics["feature_extractor"] == "efficientnet-lite0"  # no Inception weights offline
    assert "Inception" in metrics["feature_note"]
    for result in metrics["results"].values():
        assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and result["num_generated"] == 12
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["num_reference"] == 1797
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "efficientnet-lite0" in report and "student@2" in report
    assert (tmp_path / "eval" / "curve.png").stat().st_size > 0 and (tmp_path / "eval" / "samples.png").is_file()


def test_evaluate_bad_inputs(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="but the model makes 8x8; pass --resize-reference"):
        evaluate(tiny_run.export_dir, "mnist5k", tmp_path / "e1", None, SMALL)
    with pytest.raises(ValueError, match="at least 4"):
        evaluate(tiny_run.export_dir, "digits", tmp_path / "e2", None, EvalSettings(num_samples=3))
    done = run_cli("evaluate", "--model", str(tiny_run.export_dir), "--reference", "digits", "--num-samples", "8",
                   "--feature-extractor", "inception-v3-compat", "--output", str(tmp_path / "e3"),
                   env={"TORCH_HOME": str(tmp_path / "empty-torch-home")})  # fmt: skip
    assert done.returncode == 1 and "needs its weights offline" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e3").exists()


def test_evaluate_against_an_image_folder_given_by_path(tiny_run, tmp_path):
    # a folder spec is a path (slashes, spaces): it names the reference in the report and keys the feature cache
    folder = tmp_path / "real images" / "test"
    save_pngs(folder, np.random.default_rng(0).integers(0, 256, (16, 8, 8), dtype=np.uint8))
    metrics = evaluate(tiny_run.export_dir, str(folder), tmp_path / "eval", None,
                       EvalSettings(steps=(2,), teacher_steps=(), num_samples=8, trust_remote_code=True))  # fmt: skip
    assert metrics["num_reference"] == 16 and metrics["reference"] == str(folder)
    assert metrics["results"]["student@2"]["fid"] > 0


def test_evaluate_resizes_the_reference_only_when_asked(tiny_run, tmp_path):
    # 16 reference images of 28x28, each one grey level, against a model that makes 8x8: refused unless asked to
    # resize; a bilinear, antialiased resize keeps each constant image constant at its own level
    folder, levels = tmp_path / "reference", list(range(0, 256, 17))
    save_pngs(folder, [np.full((28, 28), level, dtype=np.uint8) for level in levels])
    plain = EvalSettings(steps=(2,), teacher_steps=(), num_samples=8, trust_remote_code=True)
    with pytest.raises(ValueError, match="is 28x28 but the model makes 8x8; pass --resize-reference"):
        evaluate(tiny_run.export_dir, str(folder), tmp_path / "refused", None, plain)
    assert not (tmp_path / "refused").exists()
    resize = dataclasses.replace(plain, resize_reference=True)
    images, _ = reference_images(str(folder), (1, 8, 8), resize)
    assert images.shape == (16, 1, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images.amin((1, 2, 3)), images.amax((1, 2, 3)))
    assert sorted(images[:, 0, 0, 0].tolist()) == levels
    metrics = evaluate(tiny_run.export_dir, str(folder), tmp_path / "e", None, resize)
    assert metrics["num_reference"] == 16 and set(metrics["results"]) == {"student@2"}


def test_bench_smoke(tiny_run, tiny_teacher, tmp_path):
    settings = BenchSettings(teacher_steps=5, throughput_batch=4, train_batch=4, resolutions=(8,), widths=(8,),
                             repeats=1, trust_remote_code=True)  # fmt: skip
    results = bench(tiny_run.export_dir, tmp_path / "bench", str(tiny_teacher), settings)
    sampling = results["sampling"]["network_batch1"]
    assert sampling["teacher_steps"] == 5 and sampling["speedup_2_step"] > 0
    assert results["sampling"]["end_to_end_batch1"]["student_2_step_ms"] > 0
    training = results["training"][0]
    assert set(training["timings"]) >= {"forward", "diffusion_step", "jvp", "scd_step", "teacher_forward"}
    assert training["scd_over_diffusion"] > 0 and len(results["scaling"]) == 2
    assert all((tmp_path / "bench" / f).is_file() for f in ("bench.json", "training.png", "scaling.png"))
    # central difference in fp32: O(h^2) truncation + O(eps_fp32 / h) rounding, ~1e-4 relative at h = 1e-3
    assert results["finite_difference"][0]["relative_error"]["h=0.001"] < 1e-2


@pytest.mark.parametrize("make_case", [
    lambda: sd_unet_case(2, latent_size=8, widths=(32, 64), layers=1, text_tokens=5, text_dim=16, heads=2),
    lambda: dit_case(tokens=16, batch_size=2, depth=1, heads=2, head_dim=8),
])  # fmt: skip
def test_gpu_suite_cases_build_and_time_on_cpu(make_case):
    """The cost suite's conditional cases (cross-attention to text states; class labels) at toy sizes: every part of
    both steps runs, so a GPU session spends its minutes measuring rather than debugging."""
    record = training_cost(make_case(), torch.device("cpu"), warmup=0, repeats=1)
    assert all(t["median_ms"] > 0 for t in record["timings"].values())
    assert record["scd_over_diffusion"] > 0 and record["compile_jvp"] is False
