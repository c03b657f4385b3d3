"""Issue 15 regressions, runs: nothing non-finite is exported, checkpoints know their run, resume survives damage,
one process per run folder, dropout is reproducible, and late failures leave a state the corrected rerun takes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny_pipeline, tree
from PIL import Image
from refusals import refuses
from safetensors.torch import load_file

from scm_distill.checkpoint import list_checkpoints, prune_checkpoints, save_checkpoint
from scm_distill.cli import main
from scm_distill.config import OptimConfig, resolve
from scm_distill.errors import UserError
from scm_distill.optim import make_optimizer
from scm_distill.run_lock import LOCK_NAME
from scm_distill.seeded_dropout import SeededDropout
from scm_distill.trainer import distill

QUICK = ["--set", "train.convert_steps=0", "--set", "train.sample_every=0", "--batch-size", "4"]


def run_args(teacher, out, steps: int, *extra) -> list[str]:
    return [str(a) for a in ("distill", "--teacher", teacher, "--data", "digits", "--output", out, *QUICK,
                             "--max-steps", steps, *extra)]  # fmt: skip


def log_steps(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def state_of(checkpoint) -> dict:
    return json.loads((checkpoint / "state.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# defect 5: never export what is not finite


def test_a_huge_learning_rate_stops_before_the_export(capsys, tiny_teacher, tmp_path):
    out = tmp_path / "out"
    refuses(capsys, run_args(tiny_teacher, out, 4, "--set", "optim.lr=1e30"), "so nothing is exported; resume from "
                                                                              "the last checkpoint with a lower")
    assert not (out / "pipeline").exists() and not list(out.glob(".pipeline*"))


def test_a_teacher_with_nan_weights_is_refused_before_the_folder(capsys, tmp_path):
    teacher = save_tiny_pipeline(tmp_path / "nan")
    path = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    weights["conv_in.weight"][0] = float("nan")
    from safetensors.torch import save_file

    save_file(weights, path)
    out = tmp_path / "out"
    refuses(capsys, run_args(teacher, out, 1), "the student's initial weights are not finite", absent=[out])


# ---------------------------------------------------------------------------------------------------------------
# defects 6, 13, 14: the checkpoint's fingerprint; resumable changes; the stop step


def test_resume_refuses_another_runs_checkpoint_and_names_the_field(capsys, tiny_teacher, tmp_path):
    assert main(run_args(tiny_teacher, tmp_path / "a", 1)) == 0
    assert main(run_args(tiny_teacher, tmp_path / "b", 1, "--set", "objective.P_mean=-0.5")) == 0
    theirs = list_checkpoints(tmp_path / "a")[-1]
    refuses(capsys, run_args(tiny_teacher, tmp_path / "b", 2, "--set", "objective.P_mean=-0.5", "--resume", theirs),
            "was made with a different config (objective.P_mean: -1.0 there, -0.5 now)",
            untouched=[tmp_path])  # fmt: skip
    other_teacher = tmp_path / "other-teacher"
    shutil.copytree(tiny_teacher, other_teacher)
    config = other_teacher / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "beta_end": 0.03}))
    refuses(capsys, run_args(other_teacher, tmp_path / "a", 2, "--resume", "latest"),
            "was made from another teacher", untouched=[tmp_path / "a"])  # fmt: skip


def test_resume_with_a_lower_learning_rate_is_allowed_and_recorded(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    assert main(run_args(tiny_teacher, out, 1)) == 0
    assert main(run_args(tiny_teacher, out, 2, "--set", "optim.lr=5e-5", "--resume", "latest")) == 0
    state = state_of(list_checkpoints(out)[-1])
    assert state["step"] == 2 and state["resumes"] == [{"step": 1, "changes": {"optim.lr": [1e-4, 5e-5],
                                                                               "train.max_steps": [1, 2]}}]
    assert log_steps(out)[-1]["lr"] == 5e-5


def test_resume_below_the_checkpoints_step_is_refused_and_the_card_counts_real_steps(capsys, tiny_teacher,
                                                                                      tmp_path):  # fmt: skip
    out = tmp_path / "out"
    assert main(run_args(tiny_teacher, out, 2)) == 0
    card = (out / "pipeline" / "README.md").read_text()
    assert "| sCD steps x batch | 2 x 4 |" in card and "| conversion steps x batch | 0 x 4 |" in card
    refuses(capsys, run_args(tiny_teacher, out, 1, "--resume", "latest"),
            "is at step 2, beyond the 1 steps this run is set to", untouched=[out])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# defect 8: deterministic dropout


def test_dropout_masks_are_shared_within_a_step_and_leave_the_rng_alone():
    net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Dropout(0.5)).train()
    seeded = SeededDropout(net)
    x = torch.ones(2, 4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with seeded.step(7, torch.device("cpu")):
        first, second = net(x), net(x)  # the JVP pass and the gradient pass
    with seeded.step(8, torch.device("cpu")):
        other = net(x)
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG state leaks out of a step


def test_dropout_runs_are_reproducible_and_resume_exactly(tiny_teacher, tmp_path):
    def run(name, steps, resume=None):
        config = resolve(cli={"teacher": str(tiny_teacher), "output": str(tmp_path / name), "data": {"spec": "digits"},
                              "student": {"dropout": 0.1},
                              "train": {"max_steps": steps, "convert_steps": 1, "batch_size": 4, "sample_every": 0,
                                        "checkpoint_every": 0, "log_every": 1}})  # fmt: skip
        distill(config, resume=resume)
        return [r["loss"] for r in log_steps(tmp_path / name)]

    torch.manual_seed(0)  # the caller's RNG state must not matter
    first = run("first", 3)
    torch.manual_seed(99)
    assert run("second", 3) == first
    run("resumed", 1)
    assert run("resumed", 3, resume="latest") == first


# ---------------------------------------------------------------------------------------------------------------
# defect 9: validate before the folder exists; a late failure leaves a state the corrected rerun takes


@pytest.mark.parametrize("extra, match", [
    (["--batch-size", "5000"], "has 1797 images, fewer than one batch of 5000"),
    (["--set", "student.prediction=flow"], "LCMScheduler cannot read a flow student"),
])  # fmt: skip
def test_late_failures_are_found_before_the_folder_exists(capsys, tiny_teacher, tmp_path, extra, match):
    out = tmp_path / "out"
    refuses(capsys, [*run_args(tiny_teacher, out, 1), *extra], match, absent=[out])


def test_torch_optimizer_rejections_are_one_sentence():
    with pytest.raises(UserError, match="the radam optimizer refuses the optim settings"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimConfig(lr=-1.0))


def truncated_png(path) -> None:
    Image.new("L", (8, 8), color=200).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])  # the header reads; the pixels do not


def test_a_truncated_png_mid_run_saves_a_checkpoint_the_fixed_rerun_resumes(capsys, tiny_teacher, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(7):
        Image.new("L", (8, 8), color=i * 30).save(data / f"{i}.png")
    truncated_png(data / "bad.png")
    out = tmp_path / "out"
    args = [str(a) for a in ("distill", "--teacher", tiny_teacher, "--data", data, "--output", out, *QUICK,
                             "--max-steps", 4)]  # fmt: skip
    refuses(capsys, args, "bad.png' of data", untouched=[data])
    saved = list_checkpoints(out)
    assert len(saved) == 1 and not (out / "pipeline").exists()
    Image.new("L", (8, 8), color=200).save(data / "bad.png")
    assert main([*args, "--resume", "latest"]) == 0 and (out / "pipeline" / "model_index.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# defect 10: one process per run folder


def test_a_second_process_on_a_run_folder_is_refused_and_a_stale_lock_is_taken_over(capsys, tiny_teacher, tmp_path):
    out = tmp_path / "out"
    assert main(run_args(tiny_teacher, out, 1)) == 0 and not (out / LOCK_NAME).exists()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": alive.pid, "host": os.uname().nodename, "started": 0}))
        refuses(capsys, run_args(tiny_teacher, out, 2, "--resume", "latest"), f"is in use by process {alive.pid}",
                untouched=[out])  # fmt: skip
    finally:
        alive.kill()
        alive.wait()
    with pytest.warns(UserWarning, match="taking over the stale lock"):  # its process has ended
        assert main(run_args(tiny_teacher, out, 2, "--resume", "latest")) == 0
    assert not (out / LOCK_NAME).exists() and [r["step"] for r in log_steps(out)] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# defect 12: damage-tolerant resume


def test_a_torn_last_log_line_is_dropped_on_resume(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    assert main(run_args(tiny_teacher, out, 1)) == 0
    with open(out / "log.jsonl", "a") as log:
        log.write('{"step": 2, "phase": "sc')  # killed while writing
    assert main(run_args(tiny_teacher, out, 2, "--resume", "latest")) == 0
    assert [r["step"] for r in log_steps(out)] == [1, 2]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_one(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    assert main(run_args(tiny_teacher, out, 3, "--set", "train.checkpoint_every=1", "--set", "train.log_every=1")) == 0
    straight = log_steps(out)
    newest = list_checkpoints(out)[-1]
    (newest / "ema.safetensors").write_bytes(b"\x00torn")
    with pytest.warns(UserWarning, match="Resuming from the older 'step-0000002' instead"):
        assert main(run_args(tiny_teacher, out, 3, "--set", "train.checkpoint_every=1", "--set", "train.log_every=1",
                             "--resume", "latest")) == 0  # fmt: skip
    assert log_steps(out)[-1]["loss"] == straight[-1]["loss"]  # step 3 recomputed exactly


def test_checkpoints_are_fsynced_and_pruned_without_a_half_deleted_one_visible(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    weights = {"w": torch.ones(2)}
    for step in (1, 2):
        save_checkpoint(tmp_path / "checkpoints" / f"step-000000{step}", weights, weights, {"state": {},
                        "param_groups": []}, {"step": step})  # fmt: skip
    assert sum(p.endswith(".safetensors") for p in synced) >= 3 and str(tmp_path / "checkpoints") in synced

    def killed_while_deleting(path, *args, **kwargs):
        raise KeyboardInterrupt  # the process dies in the middle of deleting the old checkpoint

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002"]  # the old one is no longer visible


def test_stale_temporaries_of_killed_runs_are_removed_and_nothing_else(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    assert main(run_args(tiny_teacher, out, 1)) == 0
    stale = [out / ".pipeline.tmp-0123abcd", out / "checkpoints" / ".step-0000009.tmp-89abcdef",
             out / "checkpoints" / ".step-0000001.trash-00ff00ff"]  # fmt: skip
    for folder in stale:
        folder.mkdir()
        (folder / "partial").write_text("x")
    (out / ".my-notes").mkdir()
    (out / "draft.tmp-notes").write_text("not ours")
    assert main(run_args(tiny_teacher, out, 2, "--resume", "latest")) == 0
    assert not any(folder.exists() for folder in stale)
    assert (out / ".my-notes").is_dir() and (out / "draft.tmp-notes").is_file() and ".my-notes" in tree(out)


def test_teacher_fingerprints_see_configs_weight_headers_and_module_content(tmp_path):
    from scm_distill.fingerprint import folder_fingerprint, module_fingerprint

    teacher = save_tiny_pipeline(tmp_path / "teacher")
    original = folder_fingerprint(teacher)
    (teacher / "README.md").write_text("docs are not identity")
    assert folder_fingerprint(teacher) == original
    scheduler = teacher / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "beta_end": 0.03}))
    changed_config = folder_fingerprint(teacher)
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v[:1] for k, v in load_file(weights).items()}, weights)  # other shapes: another header
    assert len({original, changed_config, folder_fingerprint(teacher)}) == 3
    state = {"w": torch.zeros(3)}
    assert module_fingerprint(state, True) != module_fingerprint({"w": torch.ones(3)}, True)
    assert module_fingerprint(state, False) == module_fingerprint({"w": torch.ones(3)}, False)  # names, shapes
