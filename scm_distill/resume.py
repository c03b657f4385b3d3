"""Resuming a run: its counters (RunState), which checkpoint to load, and loading it after checking whose it is.

A replicated checkpoint (checkpoint.py) or a sharded one (sharded_checkpoint.py) resumes only in its own layout,
with the same processes x micro-batches, and with the fingerprint of this run's teacher, student and math
(fingerprint.py); log.jsonl is cut back to the step resumed from, so the resumed run rewrites the same records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import check_state_dict, list_checkpoints, load_checkpoint, load_newest_checkpoint
from .ema import EMA
from .errors import UserError
from .files import write_atomic
from .fingerprint import check_fingerprint
from .sharded_checkpoint import SHARDED, check_resume, load_sharded_checkpoint
from .student import Student


@dataclass
class RunState:
    """Counters saved with each checkpoint."""

    step: int = 0
    samples_seen: int = 0
    skipped_total: int = 0
    skipped_in_a_row: int = 0
    train_seconds: float = 0.0
    best_distance: float | None = None  # the collapse monitor's best distance so far (monitor.py) and its step
    best_step: int | None = None
    degraded: bool = False  # the last measurement was over the monitor's degradation rule (warned once)


def run_state(saved: dict, checkpoint: Path) -> RunState:
    """The counters of a checkpoint's state.json (monitor fields default: checkpoints from before the monitor)."""
    fields = RunState.__dataclass_fields__
    required = ("step", "samples_seen", "skipped_total", "skipped_in_a_row", "train_seconds")
    missing = [k for k in required if k not in saved]
    if missing:
        raise UserError(f"checkpoint '{checkpoint}' has a state.json without '{missing[0]}'.")
    return RunState(**{k: saved[k] for k in fields if k in saved})


def read_resume_checkpoint(run_dir: Path, resume: str) -> tuple[Path, tuple]:
    """`latest` -> the newest checkpoint of the run that reads back; otherwise the checkpoint folder named."""
    if resume == "latest":
        return load_newest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UserError(f"--resume '{resume}' is not a checkpoint folder (no state.json).")
    return path, load_checkpoint(path)


def restore(checkpoint: Path, contents: tuple, student: Student, ema: EMA, optimizer: torch.optim.Optimizer,
            fingerprint: dict) -> RunState:  # fmt: skip
    """Load a checkpoint made by this same run (fingerprint) into the student, the EMA and the optimizer."""
    weights, ema_weights, optimizer_state, state = contents
    check_fingerprint(state.get("fingerprint"), fingerprint, checkpoint)
    check_state_dict(weights, student.state_dict(), f"checkpoint '{checkpoint}'")
    check_state_dict(ema_weights, ema.state_dict(), f"checkpoint '{checkpoint}' (EMA)")
    student.load_state_dict(weights)
    ema.load_state_dict(ema_weights)
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as error:
        raise UserError(f"checkpoint '{checkpoint}' has an optimizer state that does not match ({error}).") from None
    return run_state(state, checkpoint)


def check_stop_step(checkpoint: Path, state: RunState, total: int) -> None:
    if state.step > total:
        raise UserError(f"checkpoint '{checkpoint}' is at step {state.step}, beyond the {total} steps this run is set "
                        f"to (conversion + train.max_steps); pass a larger --max-steps.")  # fmt: skip


def resume_from(run_dir: Path, resume: str, storage: str, world: int, accum: int, student: Student, ema: EMA,
                optimizer: torch.optim.Optimizer, fingerprint: dict) -> tuple[Path, dict]:  # fmt: skip
    """Load the checkpoint to resume (replicated or sharded) after checking how it was stored and whose it is;
    returns it and its state.json."""
    if resume != "latest":
        checkpoint = Path(resume)
        if not (checkpoint / "state.json").is_file():
            raise UserError(f"--resume '{resume}' is not a checkpoint folder (no state.json).")
        check_resume(checkpoint, storage, world * accum, world)
    if storage == SHARDED:
        checkpoint = checkpoint if resume != "latest" else newest_checkpoint(run_dir)
        check_resume(checkpoint, storage, world * accum, world)
        saved = load_sharded_checkpoint(checkpoint, student, ema, optimizer)
        check_fingerprint(saved.get("fingerprint"), fingerprint, checkpoint)
        return checkpoint, saved
    checkpoint, contents = read_resume_checkpoint(run_dir, resume)
    check_resume(checkpoint, storage, world * accum, world)
    restore(checkpoint, contents, student, ema, optimizer, fingerprint)
    return checkpoint, contents[3]


def newest_checkpoint(run_dir: Path) -> Path:
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise UserError(f"there is no checkpoint to resume in '{run_dir}'.")
    return checkpoints[-1]


def truncate_log(path: Path, step: int) -> None:
    """Drop log records after the step a run resumes from (they are recomputed identically) and a torn last line
    (a run killed while writing it)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    write_atomic(path, "".join(f"{line}\n" for line in kept))
