"""Any checkpoint of a run as the pipeline folder the run's end writes (`scm-distill export`, `--export best`).

The run's own `config.json` rebuilds the teacher, the data check (latent families measure sigma_d on it, as the run
did) and the student; the checkpoint's weights (replicated or sharded, EMA or raw) are loaded with the same key and
shape checks as a resume, then `run_outputs.export_student` writes the folder - the same code path as the run's end.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import check_state_dict, list_checkpoints
from .config import DistillConfig, config_from_json
from .errors import UserError
from .families import Teacher
from .sharded_checkpoint import SHARDED, read_facts, read_sharded_tensors
from .student import Student

BEST = "best"  # checkpoints/best: the collapse monitor's best checkpoint (monitor.py), never pruned
Weights = Literal["ema", "raw"]


def run_config(run_dir: Path) -> DistillConfig:
    """The resolved config a run wrote to its folder."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a run folder (no config.json).")
    return config_from_json(path)


def checkpoint_folder(run_dir: Path, which: str) -> Path:
    """'latest' (the newest step), 'best' (the collapse monitor's) or a step number -> its checkpoint folder."""
    run_dir = Path(run_dir)
    steps = list_checkpoints(run_dir)
    if which == "latest":
        if not steps:
            raise UserError(f"run '{run_dir}' has no checkpoint.")
        return steps[-1]
    if which == BEST:
        folder = run_dir / "checkpoints" / BEST
        if not (folder / "state.json").is_file():
            raise UserError(f"run '{run_dir}' has no best checkpoint (the collapse monitor needs train.sample_every "
                            f"> 0).")  # fmt: skip
        return folder
    if not which.isdigit():
        raise UserError(f"--checkpoint must be a step number, 'latest' or 'best', got '{which}'.")
    for folder in steps:
        if int(folder.name.split("-")[1]) == int(which):
            return folder
    kept = ", ".join(str(int(p.name.split("-")[1])) for p in steps) or "none"
    raise UserError(f"run '{run_dir}' has no checkpoint of step {int(which)} (kept: {kept}; best).")


def checkpoint_weights(folder: Path, weights: Weights = "ema") -> dict[str, torch.Tensor]:
    """The student's state dict stored in a checkpoint: the EMA (what runs export) or the raw trained weights."""
    facts = read_facts(folder)
    if facts.get("layout") == SHARDED:
        prefix = f"{'ema' if weights == 'ema' else 'student'}."
        return {k[len(prefix):]: v for k, v in read_sharded_tensors(folder).items() if k.startswith(prefix)}
    name = "ema.safetensors" if weights == "ema" else "student.safetensors"
    try:
        return load_file(Path(folder) / name)
    except (OSError, SafetensorError) as error:
        raise UserError(f"checkpoint '{folder}' is missing or corrupted ({error.__class__.__name__}).") from None


def with_weights(student: Student, tensors: dict[str, torch.Tensor], what: str) -> Student:
    """A copy of the student holding the checkpoint's weights (keys and shapes checked first)."""
    check_state_dict(tensors, student.state_dict(), what)
    loaded = copy.deepcopy(student)
    loaded.load_state_dict(tensors)
    return loaded


@dataclass
class RunCheckpoint:
    config: DistillConfig
    teacher: Teacher
    student: Student  # holding the checkpoint's weights
    state: dict  # the checkpoint's state.json
    folder: Path


def load_run_checkpoint(run_dir: Path, which: str = "latest", weights: Weights = "ema", trust_remote_code: bool = False,
                        device: str | torch.device = "cpu") -> RunCheckpoint:  # fmt: skip
    """The run's teacher and a student holding one checkpoint's weights (see the module docstring)."""
    from .trainer import make_student, setup

    config = run_config(run_dir)
    folder = checkpoint_folder(run_dir, which)
    teacher, _ = setup(config, torch.device(device), 1, None, trust_remote_code)
    student = make_student(config, teacher).to(device)
    loaded = with_weights(student, checkpoint_weights(folder, weights), f"checkpoint '{folder}'")
    return RunCheckpoint(config, teacher, loaded.eval(), read_facts(folder), folder)


def export_checkpoint(run_dir: Path, output: Path, which: str = "latest", weights: Weights = "ema",
                      trust_remote_code: bool = False) -> Path:  # fmt: skip
    """Write the pipeline folder of one checkpoint of a run (the same folder the run's end writes)."""
    from .resume import run_state
    from .run_outputs import export_student

    found = load_run_checkpoint(run_dir, which, weights, trust_remote_code)
    config, state = found.config, run_state(found.state, found.folder)
    convert = config.train.convert_steps if found.student.model.prediction != found.teacher.model.prediction else 0
    world = int(found.state.get("virtual_ranks", 1))
    label = f"{which} (step {state.step}, {'EMA' if weights == 'ema' else 'raw trained'} weights)"
    return export_student(config, found.teacher, found.student, Path(output), Path(run_dir), state, convert, world,
                          checkpoint=label, grid_step=state.step)  # fmt: skip

