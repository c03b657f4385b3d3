"""examples/family_benchmark.py at toy size end to end for a latent (sd) and a flow (sd3) family and the module row
in one benchmark folder (the second reuses the first's VAE, data and reference), and its refusals: an unknown
family, a reused teacher of another family or size, missing Fashion-MNIST - one sentence, exit 1, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tree

sys.path.insert(0, str(REPO / "examples"))

from family_benchmark import main  # noqa: E402

from scm_distill.data.builtin import FASHION_ENV, fashion_dir, read_fashion_idx  # noqa: E402

SAMPLERS = {"teacher_default", "teacher_2", "student_1", "student_2"}


def fashion_installed() -> bool:
    return read_fashion_idx(fashion_dir(), "train") is not None


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    if not fashion_installed():
        pytest.skip("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("bench") / "out"
    for family in ("sd", "sd3", "module"):
        main(["--family", family, "--size", "toy", "--output", str(root)])
    return root


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_toy_benchmark_writes_every_number_the_issue_names(bench, family):
    summary = json.loads((bench / family / f"family-{family}-toy.json").read_text())
    assert set(summary["fd"]) == SAMPLERS and all(v > 0 for v in summary["fd"].values())
    assert {"teacher_default", "student_2"} <= set(summary["accuracy"])
    assert all(0 <= v <= 1 for v in summary["accuracy"].values())
    assert summary["minutes"]["total"] > 0 and summary["command"].startswith("python examples/family_benchmark.py")
    assert "CPUs" in summary["machine"]
    assert summary["stages_done"] == ["teacher", "data", "distill", "evaluate", "timing", "grid", "plain_diffusers"]
    assert summary["plain_diffusers"]["loaded"] and summary["plain_diffusers"]["same"], summary["plain_diffusers"]
    timing = summary["timing_batch1"]
    for sampler in ("teacher", "student_2", "student_1"):
        assert 0 < timing[sampler]["network_ms"] <= timing[sampler]["end_to_end_ms"]
    metrics = json.loads((bench / family / "results.json").read_text())["metrics"]
    assert metrics["class_accuracy"] == "fashion-mnist" and metrics["feature_extractor"] == "efficientnet-lite0"
    for name in ("results.md", "class_grid.png", "evaluation/samples.png", "run/pipeline/model_index.json"):
        assert (bench / family / name).is_file()


def test_toy_module_row_distills_through_the_public_api_and_reloads_in_a_fresh_process(bench):
    summary = json.loads((bench / "module" / "family-module-toy.json").read_text())
    assert set(summary["fd"]) == SAMPLERS and all(v > 0 for v in summary["fd"].values())
    assert set(summary["accuracy"]) == SAMPLERS and all(0 <= v <= 1 for v in summary["accuracy"].values())
    assert summary["stages_done"] == ["teacher", "distill", "evaluate", "timing", "grid", "plain_diffusers"]
    fresh = summary["plain_diffusers"]["fresh_process"]
    assert fresh["loaded"] and fresh["same"] and fresh["samples"] == 10, fresh
    reading = json.loads((bench / "module" / "run" / "pipeline" / "scm_reading.json").read_text())
    assert reading["classes"] == {"num_classes": 10, "null_class": 10, "guidance_scale": 2.0}
    assert reading["time_scale"] == 1e-3 and reading["data_range"] == [-0.5, 0.5] and reading["sigma_data"] == 0.25
    assert (bench / "module" / "class_grid.png").is_file()


def test_families_of_one_folder_share_the_vae_data_and_reference(bench):
    assert sorted(p.name for p in bench.iterdir() if p.is_dir()) == ["module", "reference", "sd", "sd3",
                                                                    "train-captions-64", "vae-kl"]  # fmt: skip
    info = json.loads((bench / "sd3" / "teacher" / "teacher_info.json").read_text())
    assert info["vae"] == str(bench / "vae-kl")
    # the first row trained the shared VAE: its minutes are recorded apart and left out of that row's total
    first, second = (json.loads((bench / f / f"family-{f}-toy.json").read_text())["minutes"] for f in ("sd", "sd3"))
    assert first["shared_vae"] > 0 and "shared_vae" not in second
    stages = {k: v for k, v in first.items() if k not in ("total", "shared_vae")}
    assert first["total"] == pytest.approx(sum(stages.values()), abs=0.011)


def refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_unknown_family_lists_the_known_ones(tmp_path, capsys):
    message = refused(["--family", "sd4", "--size", "toy", "--output", str(tmp_path / "out")], capsys)
    assert "unknown family 'sd4'" in message and "sd, sdxl, dit, sd3, flux, sana, edm, module" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("facts,says", [({"family": "sd3", "size": "toy"}, "is a sd3 teacher of size toy"),
                                        ({"family": "sd", "size": "cpu"}, "is a sd teacher of size cpu")])  # fmt: skip
def test_a_reused_teacher_of_another_family_or_size_is_refused(tmp_path, capsys, facts, says):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "teacher_info.json").write_text(json.dumps(facts))
    out = tmp_path / "out"
    message = refused(["--family", "sd", "--size", "toy", "--output", str(out), "--teacher", str(teacher)], capsys)
    assert says in message and "not the sd teacher of size toy" in message
    assert tree(out) == []


def test_missing_fashion_mnist_names_the_debian_package_and_the_datasets_fallback(tmp_path):
    env = {**os.environ, FASHION_ENV: str(tmp_path / "none"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO)}  # fmt: skip
    done = subprocess.run([sys.executable, "examples/family_benchmark.py", "--family", "sd", "--size", "toy",
                           "--output", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "dataset-fashion-mnist" in lines[0] and "`datasets` fallback" in lines[0]
    assert not (tmp_path / "out").exists()


def test_evaluate_reads_the_teacher_at_the_exports_size_not_the_pipelines_default(tmp_path):
    """FLUX's pipeline makes 1024 px by default and its shift depends on the token count: evaluate's teacher must
    sample at the export's size, with the shift of that size (found by the toy FLUX benchmark, which sampled the
    teacher at 1024 px against 32 px references)."""
    from tiny_pipelines import save_tiny

    from scm_distill.families import load_teacher
    from scm_distill.families.flow import dynamic_shift

    teacher = load_teacher(str(save_tiny("flux", tmp_path / "teacher")))
    assert teacher.resolution == (1024, 1024)
    teacher.at_resolution((32, 32))
    h, w = teacher.space.latent_size((32, 32))
    assert teacher.sample_shape == (teacher.space.channels, h, w)
    expected = dynamic_shift(teacher.scheduler_config, teacher.image_tokens(h, w))
    x = torch.randn(1, *teacher.sample_shape)
    again = load_teacher(str(tmp_path / "teacher"))
    again.resolution = (32, 32)
    again.model = again._teacher_model(teacher.model.sigma_d)  # the reading prepare() builds for 32 px data
    t = torch.tensor([0.7])
    condition = teacher.condition_for({"prompt": ["a"]})
    assert torch.allclose(teacher.model.F(x, t, condition), again.model.F(x, t, condition))
    assert expected != dynamic_shift(teacher.scheduler_config, teacher.image_tokens(128, 128))


def test_the_table_checks_each_bar_at_its_edge():
    """examples/family_table.py's bars: 2.0x the teacher's FD at its default steps, 0.5x its 2-step FD, 5 points
    of accuracy, the same samples without scm_distill, 60 minutes - met at the edge, missed just past it."""
    from family_table import bars, row

    def summary(student_fd: float, student_accuracy: float, minutes: float) -> dict:
        return {"family": "sd", "fd": {"teacher_default": 10.0, "teacher_2": 40.0, "student_2": student_fd,
                                       "student_1": 50.0},
                "accuracy": {"teacher_default": 0.80, "student_2": student_accuracy},
                "plain_diffusers": {"loaded": True, "same": True}, "minutes": {"total": minutes},
                "teacher": {"parameters": {"denoiser": 3_300_000}, "default_steps": 50}}  # fmt: skip

    assert all(bars(summary(20.0, 0.76, 60.0)).values())  # 2.0 x 10 = 0.5 x 40 = 20
    missed = bars(summary(20.01, 0.7499, 60.1))
    assert list(missed.values()) == [False, False, False, True, False]  # the samples bar still holds
    assert "misses: fd <= 2.0x teacher@default; fd <= 0.5x teacher@2" in row(summary(20.01, 0.76, 10.0))
