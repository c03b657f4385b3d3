"""Watching a run (issue 16 item 1): TensorBoard event files read back with tensorboard's own reader, W&B offline,
and loss.png in every run folder."""

import json

import pytest
from test_trainer import tiny_config

from scm_distill.trainer import distill


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_tensorboard_holds_the_logged_loss_the_monitor_and_the_grids(tiny_teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = distill(tiny_config(tiny_teacher, tmp_path / "run", sample_every=2, report_to="tensorboard"))
    logs = result.run_dir / "logs" / "scm-distill"
    events = EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    logged = records(result.run_dir)
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [r["step"] for r in logged]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    monitor = {e.step: e.value for e in events.Scalars("monitor")}
    assert monitor == pytest.approx({r["step"]: r["monitor"] for r in logged if "monitor" in r}, rel=1e-6)
    assert set(monitor) == {2, 4, 5}
    for name in ("grad_norm", "lr", "skipped", "samples_per_second"):
        assert len(events.Scalars(name)) >= len(logged) - 1, name
    assert [e.step for e in events.Images("samples")] == [2, 4, 5]
    assert (result.run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_run_folder_gets_a_loss_plot(tiny_teacher, tmp_path):
    result = distill(tiny_config(tiny_teacher, tmp_path / "run"))
    assert (result.run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (result.run_dir / "logs").exists()  # report_to none: no tracker files


def test_wandb_offline(tiny_teacher, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = distill(tiny_config(tiny_teacher, tmp_path / "run", report_to="wandb"))
    runs = list((result.run_dir / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
