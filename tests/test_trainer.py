"""The training loop end to end on a tiny teacher: exact resume, two-process DDP, export, non-finite steps."""

import json

import pytest
import torch
from conftest import run_two_processes, save_tiny_pipeline, tree
from safetensors.torch import load_file

from scm_distill.config import resolve
from scm_distill.trainer import NonFiniteError, distill


def tiny_config(teacher, output, **train):
    settings = {"max_steps": 3, "convert_steps": 2, "batch_size": 8, "sample_every": 0, "checkpoint_every": 0,
                "log_every": 1, **train}  # fmt: skip
    return resolve(cli={"teacher": str(teacher), "output": str(output), "data": {"spec": "digits"},
                        "train": settings})  # fmt: skip


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_resume_gives_the_same_loss_curve_and_weights(tiny_teacher, tmp_path):
    straight = distill(tiny_config(tiny_teacher, tmp_path / "straight", max_steps=4))
    distill(tiny_config(tiny_teacher, tmp_path / "resumed", max_steps=2))  # stops after 2 + 2 steps
    resumed = distill(tiny_config(tiny_teacher, tmp_path / "resumed", max_steps=4), resume="latest")
    assert len(losses(straight.run_dir)) == 6
    assert losses(resumed.run_dir) == losses(straight.run_dir)  # bitwise: every step re-seeds from its number
    for key, value in straight.ema.state_dict().items():
        assert torch.equal(value, resumed.ema.state_dict()[key]), key
    assert (resumed.export_dir / "model_index.json").is_file()


def test_run_dir_contents(tiny_teacher, tmp_path):
    result = distill(tiny_config(tiny_teacher, tmp_path / "run", sample_every=2, checkpoint_every=2))
    run = result.run_dir
    config = json.loads((run / "config.json").read_text())
    assert config["teacher"] == str(tiny_teacher) and config["train"]["max_steps"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step-0000004", "step-0000005"]
    assert (run / "samples" / "step-0000002.png").is_file() and (run / "samples" / "step-0000005.png").is_file()
    card = (result.export_dir / "README.md").read_text()
    assert "library_name: diffusers" in card and "num_inference_steps=2" in card and "trust_remote_code" not in card
    assert not any(p.suffix in {".bin", ".pt", ".pth"} for p in result.export_dir.rglob("*"))


def test_two_cpu_processes_keep_identical_replicas(tiny_teacher, tmp_path):
    """torchrun, 2 processes, gloo: after 2 sCD steps both ranks hold the same weights, which moved."""
    done = run_two_processes("ddp_worker.py", str(tiny_teacher), str(tmp_path / "run"), str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    initial = load_file(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors")
    moved = [not torch.equal(rank0[f"model.network.{k}"], v) for k, v in initial.items()]
    assert any(moved)


def test_non_finite_steps_are_skipped_and_stop_the_run(tmp_path):
    teacher = save_tiny_pipeline(tmp_path / "nan-teacher")
    path = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    # finite weights whose output overflows float32: every loss is inf (a NaN weight is refused before training)
    weights["conv_out.bias"] = torch.full_like(weights["conv_out.bias"], torch.finfo(torch.float32).max)
    from safetensors.torch import save_file

    save_file(weights, path)
    config = tiny_config(teacher, tmp_path / "run", max_steps=10, convert_steps=0, max_nonfinite_in_a_row=3)
    with pytest.raises(NonFiniteError, match="3 steps in a row had a non-finite loss or gradient"):
        distill(config)
    assert not (tmp_path / "run" / "pipeline").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [1, 2]  # counted and logged, never applied


def test_a_failing_export_leaves_nothing_half_written(tiny_teacher, tmp_path, monkeypatch):
    def broken_card(folder, *args, **kwargs):
        (folder / "partial.txt").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr("scm_distill.export.pipeline.write_model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        distill(tiny_config(tiny_teacher, tmp_path / "run"))
    assert [p for p in tree(tmp_path / "run") if p.startswith(("pipeline", ".pipeline"))] == []
