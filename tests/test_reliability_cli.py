"""Issue 15 regressions, command line: user errors are one sentence (exit 1), bugs keep their traceback (exit 2),
numbers are validated before anything is written, output folders are never emptied of files we did not create,
and every failure of the outside world (files, network) is one sentence."""

import errno
import json
import pathlib
import socket

import pytest
from conftest import save_tiny_pipeline
from huggingface_hub.errors import HTTPError, OfflineModeIsEnabled
from PIL import Image
from refusals import refuses

from scm_distill import cli_read
from scm_distill.cli import main
from scm_distill.config import resolve
from scm_distill.errors import UserError

QUICK = ["--max-steps", "1", "--set", "train.convert_steps=0", "--set", "train.sample_every=0", "--batch-size", "4"]


def distill_args(teacher, out, *extra) -> list:
    return [str(a) for a in ("distill", "--teacher", teacher, "--data", "digits", "--output", out, *QUICK, *extra)]


# ---------------------------------------------------------------------------------------------------------------
# errors: one sentence for the user's, a traceback for bugs (review finding: cli.main caught every ValueError)


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(capsys, monkeypatch):
    def raising(error):
        def run(args):
            raise error
        return run

    monkeypatch.setattr(cli_read, "run_sample", raising(ValueError("an internal invariant broke")))
    assert main(["sample", "--model", "m"]) == 2  # a plain ValueError is a bug, not the user's input
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal invariant broke" in err and "this is a bug" in err
    monkeypatch.setattr(cli_read, "run_sample", raising(UserError("the model 'm' is wrong\nin two lines.")))
    assert main(["sample", "--model", "m"]) == 1
    assert capsys.readouterr().err == "scm-distill sample: error: the model 'm' is wrong\\nin two lines.\n"
    with pytest.raises(UserError):  # --debug shows the traceback of any error, before or after the command
        main(["--debug", "sample", "--model", "m"])
    with pytest.raises(UserError):
        main(["sample", "--model", "m", "--debug"])
    monkeypatch.setattr(cli_read, "run_sample", raising(KeyboardInterrupt()))
    assert main(["sample", "--model", "m"]) == 130 and "interrupted" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# defects 5, 7, 14: every number finite and in range, before anything is written


@pytest.mark.parametrize("setting, match", [
    ("optim.lr=inf", "config field 'optim.lr' must be a finite number"),
    ("optim.lr=.nan", "config field 'optim.lr' must be a finite number"),
    ("optim.lr=0", "optim.lr must be positive"),
    ("optim.grad_clip=-1", "optim.grad_clip must be positive"),
    ("optim.grad_clip=0", "optim.grad_clip must be positive"),
    ("optim.grad_clip=.inf", "'optim.grad_clip' must be a finite number"),
    ("optim.betas=[0.9, 1.0]", "optim.betas must lie in [0, 1)"),
    ("optim.eps=0", "optim.eps must be positive"),
    ("optim.lr=true", "'optim.lr' must be a number"),
    ("train.log_every=0", "train.log_every must be at least 1"),
    ("optim.convert_lr=0", "optim.convert_lr must be positive"),
    ("train.seed=-1", "train.seed must be in [0, 2**32)"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be at least 1"),
    ("student.logvar_channels=3", "student.logvar_channels must be an even number"),
    ("sigma_data=-.inf", "'sigma_data' must be a finite number"),
    ("train.checkpoint_every=99999999999999999999", "'train.checkpoint_every' is too large"),
    ("optim.lr=[", "the value is not a valid YAML scalar"),
])  # fmt: skip
def test_numbers_out_of_range_are_refused_before_anything_is_written(capsys, tiny_teacher, tmp_path, setting, match):
    out = tmp_path / "out"
    refuses(capsys, distill_args(tiny_teacher, out, "--set", setting), match, absent=[out])


def test_max_steps_zero_is_refused(capsys, tiny_teacher, tmp_path):
    out = tmp_path / "out"
    refuses(capsys, [*distill_args(tiny_teacher, out), "--max-steps", "0"], "train.max_steps must be at least 1",
            absent=[out])  # fmt: skip


def test_conflicting_set_flags_are_one_sentence(capsys, tmp_path):
    refuses(capsys, ["distill", "--teacher", "t", "--output", tmp_path / "o", "--set", "train=3", "--set",
                     "train.seed=1", "--dry-run"], "which an earlier --set gave a value")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# defects 1, 2: never delete what we did not create


def test_overwrite_never_deletes_the_runs_own_data(capsys, tiny_teacher, tmp_path):
    out = tmp_path / "out"
    assert main(distill_args(tiny_teacher, out)) == 0
    data = out / "my-data"
    data.mkdir()
    for i in range(8):
        Image.new("L", (8, 8), color=i * 30).save(data / f"{i}.png")
    refuses(capsys, ["distill", "--teacher", tiny_teacher, "--data", data, "--output", out, *QUICK, "--overwrite"],
            "--overwrite would clear output", untouched=[out])  # fmt: skip
    refuses(capsys, [*distill_args(tiny_teacher, out), "--overwrite", "--set", f"data.latent_cache={out}/cache"],
            "holds the run's data.latent_cache", untouched=[out])  # fmt: skip


def test_demo_refuses_a_folder_that_is_not_a_previous_demo(capsys, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"someone's file")
    refuses(capsys, ["demo", "--output", out, "--max-steps", "1", "--num-samples", "2"],
            "holds files that are not a previous output of this command (no demo.json)", untouched=[out])  # fmt: skip


def test_a_previous_demo_folder_is_replaced_except_the_users_files(tiny_teacher, tmp_path):
    from scm_distill.demo import DEMO_LAYOUT
    from scm_distill.trainer import distill

    out = tmp_path / "demo-output"
    out.mkdir()
    for name in ("demo.json", "run.json", "report.json", "report.md"):
        (out / name).write_text("{}")
    (out / "notes.txt").write_text("mine")
    config = resolve(cli={"teacher": str(tiny_teacher), "output": str(out), "data": {"spec": "digits"},
                          "train": {"max_steps": 1, "convert_steps": 0, "batch_size": 4,
                                    "sample_every": 0}})  # fmt: skip
    distill(config, overwrite=True, layout=DEMO_LAYOUT)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "report.json").exists()
    assert (out / "demo.json").is_file() and (out / "pipeline" / "model_index.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# defect 11: files and folders


def test_output_under_a_file_and_a_read_only_folder(capsys, tiny_teacher, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refuses(capsys, distill_args(tiny_teacher, blocker / "run"), "is a file, not a folder", untouched=[tmp_path])
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mkdir = pathlib.Path.mkdir

    def denied(self, *args, **kwargs):  # the tests run as root, where chmod does not stop writes: fake EACCES
        if read_only in self.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", denied)
    refuses(capsys, distill_args(tiny_teacher, read_only / "run"), "permission denied", untouched=[read_only])


def test_sample_output_that_is_a_folder(capsys, tiny_run, tmp_path):
    folder = tmp_path / "grids"
    folder.mkdir()
    refuses(capsys, ["sample", "--model", tiny_run.export_dir, "--output", folder, "--trust-remote-code"],
            "is a folder; give a file name", untouched=[tmp_path])  # fmt: skip
    refuses(capsys, ["sample", "--model", tiny_run.export_dir, "--output", tmp_path / "grid.gif"],
            "must name a .png, .jpg, .jpeg or .webp file", untouched=[tmp_path])  # fmt: skip
    assert not list(tmp_path.rglob("*.tmp*"))


def write_pngs(folder, n: int = 8):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("L", (8, 8), color=i * 30).save(folder / f"{i}.png")
    return folder


def test_corrupt_png_in_the_data_names_the_file(capsys, tiny_teacher, tmp_path):
    data = write_pngs(tmp_path / "data")
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    refuses(capsys, ["distill", "--teacher", tiny_teacher, "--data", data, "--output", out, *QUICK],
            "broken.png' of the data cannot be read", absent=[out])  # fmt: skip


def test_teacher_without_unet_folder_and_with_truncated_weights(capsys, tmp_path):
    no_unet = save_tiny_pipeline(tmp_path / "no-unet")
    for path in sorted((no_unet / "unet").iterdir()):
        path.unlink()
    (no_unet / "unet").rmdir()
    out = tmp_path / "out"
    line = refuses(capsys, distill_args(no_unet, out), "names a 'unet' component in model_index.json but has no "
                                                       "'unet/' folder", absent=[out])  # fmt: skip
    assert "Hub" not in line and "huggingface.co" not in line
    truncated = save_tiny_pipeline(tmp_path / "truncated")
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refuses(capsys, distill_args(truncated, out), "diffusion_pytorch_model.safetensors' is truncated", absent=[out])


# ---------------------------------------------------------------------------------------------------------------
# defect 11: the network (faked; the real network is never touched)


@pytest.mark.parametrize("failure, match", [
    (OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled."),
     "HF_HUB_OFFLINE is set"),
    (HTTPError("[Errno -2] Name or service not known"), "the Hub cannot be reached"),
    (HTTPError("[Errno 111] Connection refused"), "Connection refused"),
    (HTTPError("timed out"), "timed out"),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), "Network is unreachable"),
])  # fmt: skip
def test_every_push_network_failure_is_one_sentence(capsys, tiny_run, monkeypatch, failure, match):
    def create_repo(*args, **kwargs):
        raise failure

    monkeypatch.setattr("scm_distill.export.push.create_repo", create_repo)
    refuses(capsys, ["push", tiny_run.export_dir, "--repo-id", "me/model", "--license", "mit"], match,
            untouched=[tiny_run.export_dir])


def test_hub_data_offline_fails_at_once_without_retries(capsys, tiny_teacher, tmp_path, monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def no_retries(*args, **kwargs):
        raise AssertionError("datasets.load_dataset must not be called when the Hub cannot be reached")

    monkeypatch.setattr("scm_distill.data.hub.socket.create_connection", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", no_retries)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    out = tmp_path / "out"
    refuses(capsys, ["distill", "--teacher", tiny_teacher, "--data", "hf:someone/images", "--output", out, *QUICK],
            "needs the Hugging Face Hub, which cannot be reached (huggingface.co: Name or service not known)",
            absent=[out])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# defect 11: Ctrl-C says how to continue


def test_ctrl_c_gives_a_resume_hint_and_the_run_resumes(capsys, tiny_teacher, tmp_path, monkeypatch):
    import scm_distill.trainer as trainer

    learning_rate = trainer.learning_rate

    def interrupted_at_step_2(step, *args, **kwargs):
        if step == 2:
            raise KeyboardInterrupt
        return learning_rate(step, *args, **kwargs)

    monkeypatch.setattr(trainer, "learning_rate", interrupted_at_step_2)
    out = tmp_path / "out"
    args = [*distill_args(tiny_teacher, out), "--max-steps", "4", "--set", "train.checkpoint_every=1"]
    line = refuses(capsys, args, "interrupted at step 2; continue from step-0000002 with --resume latest", code=130)
    assert "error" not in line
    monkeypatch.setattr(trainer, "learning_rate", learning_rate)
    assert main([*args, "--resume", "latest"]) == 0
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [4]

