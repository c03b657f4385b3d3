"""Resuming from the run folder alone (issue 16 item 7): the run's config.json is the recipe; --max-steps counts
sCD steps, and the help and the progress bar say so."""

import json

from scm_distill.cli import build_parser, main


def logged_steps(run):
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_resume_needs_only_the_run_folder(tiny_teacher, tmp_path, capsys):
    run = tmp_path / "run"
    first = ["distill", "--teacher", str(tiny_teacher), "--data", "digits", "--output", str(run), "--max-steps", "2",
             "--batch-size", "8", "--set", "train.convert_steps=1", "--set", "train.sample_every=0",
             "--set", "train.checkpoint_every=1", "--set", "train.log_every=1", "--set", "optim.lr=3e-4"]  # fmt: skip
    assert main(first) == 0
    assert "distill (1 conversion + 2 sCD steps)" in capsys.readouterr().err  # the bar's total: 3 steps
    assert main(["distill", "--output", str(run), "--resume", "latest", "--max-steps", "4"]) == 0
    assert "distill (1 conversion + 4 sCD steps)" in capsys.readouterr().err
    assert logged_steps(run) == [1, 2, 3, 4, 5]  # 1 conversion + 4 sCD steps in all
    config = json.loads((run / "config.json").read_text())
    assert config["teacher"] == str(tiny_teacher) and config["optim"]["lr"] == 3e-4  # the first command's settings
    assert config["train"]["batch_size"] == 8 and config["train"]["max_steps"] == 4


def test_max_steps_help_says_what_it_counts():
    distill = build_parser()._subparsers._group_actions[0].choices["distill"]
    text = " ".join(distill.format_help().split())
    assert "sCD optimizer steps, counted after the train.convert_steps conversion steps" in text
    assert "the run's own config.json is the recipe" in text
