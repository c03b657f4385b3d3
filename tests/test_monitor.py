"""The collapse monitor (issue 12 item 5): a run made to collapse is flagged, and `--export best` exports the
checkpoint from before the collapse; `scm-distill export` turns any checkpoint into the run's pipeline folder."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file

from scm_distill.config import resolve
from scm_distill.demo import DEMO_TEACHER
from scm_distill.monitor import DEGRADE_RATIO, degraded, paired_distance
from scm_distill.run_export import checkpoint_weights, export_checkpoint
from scm_distill.trainer import distill

CONVERT = 20  # conversion steps at a sane lr: the student is close to the teacher at their end


def collapsing_config(output, lr: float, max_steps: int = 10, **export):
    """The embedded digits teacher; after the conversion, sCD with Adam at `lr` (0.05: ~500x too high, every
    weight moves by ~lr per step, so the samples turn to mush within 5 steps while nothing is non-finite)."""
    return resolve(cli={"teacher": str(DEMO_TEACHER), "output": str(output),
                        "data": {"spec": "digits", "resize_to": 16},
                        "train": {"max_steps": max_steps, "convert_steps": CONVERT, "batch_size": 32,
                                  "sample_every": 5, "checkpoint_every": 5, "keep_checkpoints": 1, "log_every": 5,
                                  "ema_halflife_kimg": 0.5, "ema_rampup_ratio": 0.5},
                        "optim": {"name": "adam", "lr": lr, "convert_lr": 1e-3},
                        "sampling": {"teacher_steps": 20, "grid_size": 16}, "export": export})  # fmt: skip


def monitor_records(run_dir):
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["monitor"] for r in records if "monitor" in r}


def test_the_rule():
    assert paired_distance(torch.zeros(2, 3), torch.ones(2, 3)) == 1.0  # RMS of a difference of 1 everywhere
    assert not degraded(0.3, None) and not degraded(0.2 * DEGRADE_RATIO, 0.2)
    assert degraded(0.2 * DEGRADE_RATIO + 1e-6, 0.2) and degraded(float("nan"), 0.2)


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory):
    run = tmp_path_factory.mktemp("collapse") / "run"
    return distill(collapsing_config(run, lr=0.05, checkpoint="best")), run


def test_a_collapsing_run_is_flagged_and_best_exports_from_before_it(collapsed, capsys):
    result, run = collapsed
    measured = monitor_records(run)
    assert sorted(measured) == [5, 10, 15, 20, 25, 30]
    best_step = result.state.best_step
    assert best_step <= CONVERT  # the best is from before the collapse (the sCD steps at lr 0.05)
    assert measured[30] > DEGRADE_RATIO * measured[best_step] and result.state.degraded
    state = json.loads((run / "checkpoints" / "best" / "state.json").read_text())
    assert state["step"] == best_step and state["best_distance"] == measured[best_step]
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name != "best"] == ["step-0000030"]  # best kept
    exported = load_file(result.export_dir / "unet" / "diffusion_pytorch_model.safetensors")
    best = checkpoint_weights(run / "checkpoints" / "best")
    for key, value in exported.items():  # the export holds checkpoints/best's EMA, not the last step's
        assert torch.equal(value, best[f"model.network.{key}"]), key
    card = (result.export_dir / "README.md").read_text()
    assert f"best by the collapse monitor (step {best_step} of 30)" in card
    grid = (run / "samples" / f"step-{best_step:07d}.png").read_bytes()
    assert (result.export_dir / "samples.png").read_bytes() == grid  # the card shows the exported step's samples


def test_the_monitor_warns_in_one_line(tmp_path, capfd):
    distill(collapsing_config(tmp_path / "run", lr=0.05, max_steps=5))
    warned = [line for line in capfd.readouterr().err.splitlines() if "collapse monitor" in line]
    assert len(warned) == 1 and "step 25" in warned[0] and "--export best" in warned[0]


def test_an_intermediate_checkpoint_exports_its_ema_weights(collapsed, tmp_path):
    _, run = collapsed
    folder = export_checkpoint(run, tmp_path / "step30", "30")
    exported = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    stored = load_file(run / "checkpoints" / "step-0000030" / "ema.safetensors")
    assert exported.keys() == {k.removeprefix("model.network.") for k in stored if k.startswith("model.network.")}
    for key, value in exported.items():
        assert torch.equal(value, stored[f"model.network.{key}"]), key
    raw = load_file(export_checkpoint(run, tmp_path / "raw", "latest", "raw") / "unet" /
                    "diffusion_pytorch_model.safetensors")  # fmt: skip
    trained = load_file(run / "checkpoints" / "step-0000030" / "student.safetensors")
    assert all(torch.equal(v, trained[f"model.network.{k}"]) for k, v in raw.items())
    assert (folder / "model_index.json").is_file() and (folder / "scm_distill.json").is_file()


def test_export_command(collapsed, tmp_path):
    _, run = collapsed
    done = run_cli("export", str(run), "--checkpoint", "best", "--output", str(tmp_path / "best"))
    assert done.returncode == 0, done.stderr[-2000:]
    best = checkpoint_weights(run / "checkpoints" / "best")
    exported = load_file(tmp_path / "best" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, best[f"model.network.{k}"]) for k, v in exported.items())
    for args, sentence in ((("--checkpoint", "7"), "no checkpoint of step 7"),
                           (("--checkpoint", "soon"), "must be a step number, 'latest' or 'best'")):  # fmt: skip
        done = run_cli("export", str(run), *args, "--output", str(tmp_path / "x"))
        assert done.returncode == 1 and sentence in done.stderr and not (tmp_path / "x").exists()


def test_no_torch_jit_warning_from_our_jvp():
    code = "import torch; from scm_distill.attention import jvp; x = torch.ones(3); jvp(torch.sin, (x,), (x,))"
    done = subprocess.run([sys.executable, "-W", "always::FutureWarning", "-c", code], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "jit.script" not in done.stderr


def test_a_sharded_checkpoint_exports_its_ema_weights(tiny_teacher, tmp_path):
    from test_trainer import tiny_config

    from scm_distill.sharded_checkpoint import read_sharded_tensors

    config = tiny_config(tiny_teacher, tmp_path / "run", max_steps=2, convert_steps=0, parallel="fsdp",
                         checkpoint_every=1, sample_every=1)  # fmt: skip
    result = distill(config)
    stored = read_sharded_tensors(result.run_dir / "checkpoints" / "step-0000001")
    folder = export_checkpoint(result.run_dir, tmp_path / "step1", "1")
    exported = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    for key, value in exported.items():
        assert torch.equal(value, stored[f"ema.model.network.{key}"]), key
    best = json.loads((result.run_dir / "checkpoints" / "best" / "state.json").read_text())
    assert best["layout"] == "sharded" and best["step"] == result.state.best_step


def test_distill_export_flag(tmp_path, capsys):
    from scm_distill.cli import main

    args = ["distill", "--teacher", str(DEMO_TEACHER), "--output", str(tmp_path / "o"), "--dry-run"]
    assert main([*args, "--export", "best"]) == 0
    assert json.loads(capsys.readouterr().out)["export"]["checkpoint"] == "best"
    assert main([*args, "--export", "best", "--set", "train.sample_every=0"]) == 1
    assert "--export best needs the collapse monitor" in capsys.readouterr().err
