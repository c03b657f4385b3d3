"""The command line: help, dry-run, recipes, and every bad input -> one sentence, exit 1, nothing written."""

import json
import shutil

import pytest
from conftest import save_tiny_pipeline, tree

from scm_distill.cli import main
from scm_distill.config import DistillConfig, override, resolve

QUICK = ["--max-steps", "1", "--set", "train.convert_steps=0", "--set", "train.sample_every=0",
         "--batch-size", "4"]  # fmt: skip


def fails(capsys, *argv, match: str):
    """Run the CLI in-process; it must exit 1 with one line naming the problem."""
    capsys.readouterr()  # drop output of earlier calls
    assert main(list(argv)) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error:" in err, err
    assert match in err, err
    return err


def test_help_says_what_each_command_does(capsys):
    for argv in (["--help"], ["distill", "--help"], ["sample", "--help"], ["push", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "two-step consistency model" in out and "--resume" in out and "--repo-id" in out


def test_dry_run_prints_the_resolved_config(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("objective:\n  P_mean: -0.8\ntrain:\n  batch_size: 32\n")
    assert main(["distill", "--teacher", str(tmp_path), "--output", "o", "--recipe", str(recipe), "--max-steps", "7",
                 "--set", "optim.lr=3e-4", "--dry-run"]) == 0  # fmt: skip (--dry-run checks that a teacher path exists)
    config = json.loads(capsys.readouterr().out)
    assert config["objective"]["P_mean"] == -0.8 and config["train"]["batch_size"] == 32
    assert config["train"]["max_steps"] == 7 and config["optim"]["lr"] == 3e-4
    assert config["objective"]["P_std"] == DistillConfig().objective.P_std  # untouched fields keep defaults


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="unknown config field 'train.bach_size'"):
        override(DistillConfig(), {"train": {"bach_size": 3}})
    with pytest.raises(ValueError, match="'train.mixed_precision' must be one of"):
        override(DistillConfig(), {"train": {"mixed_precision": "fp8"}})
    with pytest.raises(ValueError, match="'optim.betas' must be a list of 2"):
        override(DistillConfig(), {"optim": {"betas": [0.9]}})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve(recipe=str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match="t_mid must be in"):
        resolve(cli={"teacher": "t", "output": "o", "sampling": {"t_mid": 2.0}})


def test_every_recipe_resolves():
    from conftest import REPO

    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        resolve(recipe=str(recipe), cli={"teacher": "t", "output": "o"})


@pytest.mark.parametrize("teacher, match", [
    ("{tmp}/missing", "does not exist"),
    ("nobody/no-such-model-xyz", "could not be fetched from the Hugging Face Hub"),
])  # fmt: skip
def test_unreachable_teachers(capsys, tmp_path, teacher, match):
    out = tmp_path / "out"
    fails(capsys, "distill", "--teacher", teacher.format(tmp=tmp_path), "--data", "digits", "--output", str(out),
          match=match)  # fmt: skip
    assert not out.exists()


def test_unsupported_family_and_scheduler(capsys, tiny_teacher, tmp_path):
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "MadeUpPipeline",
                                                     "unet": ["diffusers", "MadeUpUNet"]}))  # fmt: skip
    fails(capsys, "distill", "--teacher", str(sd), "--data", "digits", "--output", str(tmp_path / "o"),
          match="MadeUpPipeline pipeline, a family not supported yet")  # fmt: skip
    odd = tmp_path / "odd"
    shutil.copytree(tiny_teacher, odd)
    config_path = odd / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "beta_schedule": "zigzag"}))
    fails(capsys, "distill", "--teacher", str(odd), "--data", "digits", "--output", str(tmp_path / "o"),
          match="scheduler config is not understood")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_data_that_does_not_fit_the_teacher(capsys, tmp_path):
    teacher16 = save_tiny_pipeline(tmp_path / "t16", size=16)
    out = tmp_path / "o"
    fails(capsys, "distill", "--teacher", str(teacher16), "--data", "digits", "--output", str(out),
          match="data 'digits' has 1 channel at 8x8 but the teacher expects 1 channel at 16x16")  # fmt: skip
    assert not out.exists()
    fails(capsys, "distill", "--teacher", str(teacher16), "--data", "no-such-data", "--output", str(out),
          match="neither a built-in name")  # fmt: skip


def test_output_folder_rules(capsys, tiny_teacher, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    run = ["distill", "--teacher", str(tiny_teacher), "--data", "digits", "--output", str(out), *QUICK]
    fails(capsys, *run, match="holds files that are not a previous run; --overwrite only replaces a previous output")
    fails(capsys, *run, "--overwrite", match="holds files that are not a previous run")  # never deletes them
    assert tree(out) == ["precious.txt"]
    (out / "precious.txt").unlink()
    assert main(run) == 0 and (out / "pipeline" / "model_index.json").is_file()
    (out / "notes.txt").write_text("mine")  # a file of the user's inside a run folder survives --overwrite
    assert main([*run, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "pipeline" / "model_index.json").is_file()
    before = tree(out)
    fails(capsys, *run, match="holds a previous run; pass --resume latest")
    fails(capsys, *run, "--resume", "--set", "objective.P_mean=-0.5",
          match="different config (objective.P_mean: -1.0 there, -0.5 now)")  # fmt: skip
    assert tree(out) == before


def test_bad_checkpoints_on_resume(capsys, tiny_teacher, tmp_path):
    out = tmp_path / "o"
    assert main(["distill", "--teacher", str(tiny_teacher), "--data", "digits", "--output", str(out), *QUICK]) == 0
    checkpoint = sorted((out / "checkpoints").iterdir())[-1]
    args = ["distill", "--teacher", str(tiny_teacher), "--data", "digits", "--output", str(out), *QUICK,
            "--resume", "latest", "--max-steps", "2"]  # fmt: skip
    # mismatched: a checkpoint whose tensors belong to another model
    from safetensors.torch import load_file, save_file

    good = load_file(checkpoint / "student.safetensors")
    save_file({k: v[..., :1].contiguous() if v.dim() > 1 else v for k, v in good.items()},
              checkpoint / "student.safetensors")  # fmt: skip
    before = tree(out)
    fails(capsys, *args, match="does not match the model")
    # corrupted: truncated file
    (checkpoint / "student.safetensors").write_bytes(b"\x00\x01garbage")
    fails(capsys, *args, match="is missing or corrupted")
    assert tree(out) == before
    fails(capsys, *args[:-3], "--resume", str(tmp_path), match="is not a checkpoint folder")


def test_demo_end_to_end_with_a_relative_output(tmp_path, monkeypatch):
    # `make demo` passes a relative --output; the export is reloaded in a process whose cwd is elsewhere. The demo
    # recipe as shipped but for 1 conversion step instead of 100 (most of this test's distillation time)
    import yaml

    from scm_distill import demo

    recipe = yaml.safe_load(demo.DEMO_RECIPE.read_text())
    recipe["train"]["convert_steps"] = 1
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(demo, "DEMO_RECIPE", tmp_path / "demo.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--output", "out", "--max-steps", "2", "--num-samples", "8"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["export_matches_toolkit_sampler"] is True and report["sCD_steps"] == 2
    assert report["conversion_steps"] == 1
    assert set(report["frechet_distance"]) == {"teacher_100_steps", "teacher_2_steps", "student_2_steps",
                                               "student_1_step"}  # fmt: skip
    assert all((tmp_path / "out" / f).is_file() for f in ("report.md", "samples.png", "pipeline/model_index.json"))
