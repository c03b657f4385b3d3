"""The small things of issue 16 item 8 (and the run-directory form of sample, item 4), each checked."""

import os
import stat

import pytest
from conftest import REPO, run_cli

from scm_distill.cli import main


def test_dry_run_refuses_a_teacher_path_that_does_not_exist(tmp_path, capsys):
    status = main(["distill", "--teacher", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--dry-run"])
    assert status == 1 and "does not exist" in capsys.readouterr().err
    assert main(["distill", "--teacher", "someone/a-hub-id", "--output", str(tmp_path / "o"), "--dry-run"]) == 0


def test_sample_writes_jpeg_by_suffix_and_takes_a_run_directory(tiny_run, tmp_path):
    from PIL import Image

    for name in ("g.jpg", "g.png"):
        done = run_cli("sample", "--model", str(tiny_run.export_dir), "--num-images", "4", "--output",
                       str(tmp_path / name))  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    assert Image.open(tmp_path / "g.jpg").format == "JPEG" and Image.open(tmp_path / "g.png").format == "PNG"
    # the run's latest checkpoint, exported on the fly, gives the run's final export's images
    done = run_cli("sample", "--model", str(tiny_run.run_dir), "--checkpoint", "latest", "--num-images", "4",
                   "--output", str(tmp_path / "checkpoint.png"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "checkpoint.png").read_bytes() == (tmp_path / "g.png").read_bytes()
    done = run_cli("sample", "--model", str(tiny_run.export_dir), "--checkpoint", "2", "--output",
                   str(tmp_path / "x.png"))  # fmt: skip
    assert done.returncode == 1 and "--checkpoint needs --model to be a run directory" in done.stderr


def test_exported_files_have_the_users_umask_permissions(tiny_run):
    mask = os.umask(0o022)
    os.umask(mask)
    for path in [tiny_run.export_dir, *tiny_run.export_dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~mask, (path, oct(mode))
    for path in (tiny_run.run_dir / "checkpoints").rglob("*.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_bench_warns_for_one_repeat_and_prints_the_spread(monkeypatch, tmp_path, capsys):
    timings = {"scd_step": {"median_ms": 10.0, "min_ms": 9.0, "max_ms": 12.0, "repeats": 1}}
    results = {"training": [{"precision": "fp32", "scd_over_diffusion": 3.0, "jvp_over_forward": 2.0,
                             "timings": timings}], "sampling": {}}  # fmt: skip
    monkeypatch.setattr("scm_distill.evaluation.bench.bench", lambda *args, **kwargs: results)
    assert main(["bench", "--model", str(tmp_path), "--output", str(tmp_path / "b"), "--repeats", "1"]) == 0
    out = capsys.readouterr()
    assert "--repeats 1 times everything once" in out.err
    assert "max-min spread up to 30% of the median over 1 repeats" in out.out


def test_training_plot_legend_sits_outside_the_bars(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from scm_distill.evaluation.bench import plot_training

    shown = []
    monkeypatch.setattr(plt, "close", shown.append)
    parts = ["teacher_forward", "jvp", "student_forward_backward", "optimizer_step", "diffusion_step"]
    plot_training([{"precision": "fp32", "timings": {p: {"median_ms": 1.0} for p in parts}}], tmp_path / "t.png")
    figure = shown[0]
    figure.canvas.draw()
    axes = figure.axes[0]
    legend = axes.get_legend().get_window_extent()
    assert legend.x0 >= axes.get_window_extent().x1


def test_readme_cites_no_file_the_repo_lacks():
    text = (REPO / "README.md").read_text()
    assert "ECOSYSTEM.md" not in text
    assert text.count("7.9 min") == 1 and "~5 min" not in text  # the demo time, once


def test_eval_samples_is_gone():
    from scm_distill.config import ExportConfig

    assert not hasattr(ExportConfig(), "eval_samples")
    with pytest.raises(ValueError, match="unknown config field 'export.eval_samples'"):
        main_config = __import__("scm_distill.config", fromlist=["resolve"]).resolve
        main_config(cli={"teacher": "t", "output": "o", "export": {"eval_samples": 10}})
