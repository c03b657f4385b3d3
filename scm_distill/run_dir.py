"""The run directory: what is in it, whether an output folder may be used, and which checkpoint resumes.

Layout: run.json (marker), config.json (resolved config), log.jsonl, checkpoints/step-NNNNNNN/, samples/*.png,
pipeline/ (the export). Nothing here is touched before the teacher and the data have been checked.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from . import __version__
from .checkpoint import list_checkpoints
from .config import DistillConfig, to_dict

# Fields that may change when a run is resumed; any other difference makes the checkpoint a mismatch.
RESUMABLE_CHANGES = {"output", "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.sample_every", "train.log_every", "train.num_workers", "export.eval_samples",
                     "export.base_model_id", "sampling.grid_size", "sampling.teacher_steps",
                     "train.grad_accum_steps", "train.activation_checkpointing"}  # fmt: skip
# train.grad_accum_steps may change only with the number of processes (processes x steps is checked on resume)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "run.json").is_file()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)


def find_resume_checkpoint(run_dir: Path, resume: str) -> Path:
    """`latest` -> newest checkpoint of the run; otherwise a checkpoint folder path."""
    if resume != "latest":
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise ValueError(f"--resume '{resume}' is not a checkpoint folder (no state.json).")
        return path
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise ValueError(f"there is no checkpoint to resume in '{run_dir}'.")
    return checkpoints[-1]


def check_output(config: DistillConfig, resume: str | None, overwrite: bool) -> Path | None:
    """Decide what the output folder allows, before anything is written; returns the checkpoint to resume."""
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output '{out}' is a file, not a folder.")
    used = out.is_dir() and any(out.iterdir())
    if resume:
        if not is_run_dir(out):
            raise ValueError(f"output '{out}' does not hold a previous run to resume.")
        old = json.loads((out / "config.json").read_text())
        diff = config_differences(old, to_dict(config))
        if diff:
            raise ValueError(f"the checkpoint in '{out}' was made with a different config ({', '.join(diff[:4])}); "
                             f"resume with the same recipe and flags.")  # fmt: skip
        return find_resume_checkpoint(out, resume)
    if used and not overwrite:
        if is_run_dir(out):
            raise ValueError(f"output '{out}' holds a previous run; pass --resume latest to continue it or "
                             f"--overwrite to start over.")  # fmt: skip
        raise ValueError(f"output folder '{out}' exists and is not a previous run; pass --overwrite to replace it.")
    return None


def start_run_dir(config: DistillConfig, resuming: bool, overwrite: bool) -> Path:
    """Create (or clear, with --overwrite) the run folder and write run.json and config.json."""
    out = Path(config.output)
    if overwrite and not resuming and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resuming:
        (out / "run.json").write_text(json.dumps({"scm_distill": __version__, "created": time.time()}) + "\n")
    (out / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    return out
