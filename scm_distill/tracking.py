"""Watching a run: accelerate's trackers (`train.report_to`: TensorBoard or W&B) and `loss.png` in every run folder.

Trackers get, every `train.log_every` steps, what log.jsonl records (loss, gradient norm, learning rate, skipped
steps, samples per second) and, every `train.sample_every` steps, the collapse monitor's distance and the sample
grid as an image. TensorBoard's event files go to RUN/logs/scm-distill/, W&B's offline files under RUN/logs/wandb/
(WANDB_MODE=offline works as usual). `loss.png` is drawn from log.jsonl alone, so it is there whatever the tracker.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from .config import DistillConfig, to_dict
from .errors import UserError
from .files import write_atomic
from .fingerprint import flatten

PROJECT = "scm-distill"  # the TensorBoard subfolder / W&B project
LOGS = "logs"  # tracker files inside the run folder
LOSS_PLOT = "loss.png"
SCALARS = ("loss", "grad_norm", "lr", "skipped", "samples_per_second", "monitor")  # what trackers get per record


def check_tracker(report_to: str) -> None:
    """The tracker's package is installed (one sentence naming it otherwise), before anything is written."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if report_to in available and not available[report_to]():
        raise UserError(f"train.report_to {report_to} needs the '{report_to}' package; pip install {report_to}.")


def accelerator_trackers(config: DistillConfig) -> dict:
    """Keyword arguments of `Accelerator` for the run's tracker (none: no tracker)."""
    from accelerate.utils import ProjectConfiguration

    if config.train.report_to == "none":
        return {}
    run_dir = Path(config.output)
    return {"log_with": config.train.report_to,
            "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / LOGS))}


def hyperparameters(config: DistillConfig) -> dict:
    """The flattened config as trackers store it (TensorBoard's hparams take only bool, str, int and float)."""
    out = {}
    for key, value in flatten(to_dict(config)).items():
        out[key] = value if isinstance(value, bool | str | int | float) else str(value)
    return out


def start_trackers(accelerator, config: DistillConfig) -> None:
    if config.train.report_to == "none":
        return
    wandb = {"dir": str(Path(config.output) / LOGS), "name": Path(config.output).name}
    accelerator.init_trackers(PROJECT, config=hyperparameters(config), init_kwargs={"wandb": wandb})


def finish_trackers(accelerator) -> None:
    """Close the trackers' files (not `accelerator.end_training()`, which also destroys the process group that the
    export's gather and barriers still need)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def log_record(accelerator, record: dict) -> None:
    """One log.jsonl record's numbers to the trackers (main process only, as accelerate does)."""
    values = {k: record[k] for k in SCALARS if isinstance(record.get(k), int | float) and math.isfinite(record[k])}
    if values and accelerator.trackers:
        accelerator.log(values, step=record["step"])


def log_grid(accelerator, image, step: int) -> None:
    """The sample grid (a PIL image) to every tracker that takes images."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": np.asarray(image.convert("RGB"))[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": [image]}, step=step)


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def write_loss_plot(run_dir: Path) -> Path | None:
    """RUN/loss.png from log.jsonl: the loss per phase, the gradient norm, and the collapse monitor's distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(Path(run_dir) / "log.jsonl")
    if not records:
        return None
    monitored = [r for r in records if isinstance(r.get("monitor"), float | int)]
    panels = 3 if monitored else 2
    figure, axes = plt.subplots(panels, 1, figsize=(7, 2.4 * panels), sharex=True)
    for phase, label in (("convert", "conversion (F regression)"), ("scd", "sCD")):
        points = [(r["step"], r["loss"]) for r in records if r.get("phase") == phase and finite(r.get("loss"))]
        if points:
            axes[0].plot(*zip(*points, strict=True), label=label)
    axes[0].set_ylabel("loss")
    if axes[0].lines:  # a run whose every loss was non-finite has none
        axes[0].legend(loc="upper right", fontsize=8)
    norms = [(r["step"], r["grad_norm"]) for r in records if finite(r.get("grad_norm"))]
    if norms:
        axes[1].plot(*zip(*norms, strict=True), color="tab:gray")
    axes[1].set_ylabel("gradient norm")
    axes[1].set_yscale("log")
    if monitored:
        axes[2].plot([r["step"] for r in monitored], [r["monitor"] for r in monitored], marker="o", color="tab:red")
        axes[2].set_ylabel("collapse monitor\n(RMS px to teacher)")
    axes[-1].set_xlabel("optimizer step")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return write_atomic(Path(run_dir) / LOSS_PLOT, buffer.getvalue())


def finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
