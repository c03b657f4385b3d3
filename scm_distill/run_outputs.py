"""What a run makes of its student: the sample grids (teacher vs student on fixed noise, with the collapse monitor's
distance), the student's sampler as the export takes it, and the export with the run's facts in its card.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import checkpoint_name
from .config import DistillConfig
from .export.card import is_hub_id, teacher_license
from .export.pipeline import export_pipeline
from .families import ExportInfo, Teacher
from .generate import sampling_times, teacher_samples
from .grids import labelled_rows, save_png, to_uint8
from .monitor import images01, paired_distance
from .progress import Ticking
from .progress import bar as progress_bar
from .resume import RunState
from .student import Student


class SampleGrids:
    """Teacher vs student samples on fixed noise, written every `sample_every` steps; the student's through its
    own pipeline (what the export gives)."""

    def __init__(self, config: DistillConfig, teacher: Teacher, device: torch.device):
        self.config, self.teacher, self.device = config, teacher, device
        self.n = config.sampling.grid_size
        self.inputs = teacher.sample_inputs(self.n, torch.Generator().manual_seed(config.train.seed))
        self.teacher_row = None
        self.image = None  # the last grid written (for the trackers)

    def _generator(self) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.config.train.seed)

    def write(self, student: Student, path: Path, save: bool = True) -> float:
        """Sample and save the grid; returns the collapse monitor's distance of its 2-step row to the teacher's
        row (monitor.py). With sharded models every process samples (collective), one saves."""
        steps_teacher = self.config.sampling.teacher_steps
        evaluations = (steps_teacher if self.teacher_row is None else 0) + 3  # the teacher's row once, 2 + 1 steps
        info = sampler_info(self.config, student)
        with progress_bar(evaluations, "sampling grid", unit="NFE", disable=not save) as shown:
            if self.teacher_row is None:  # from the student's first time: both rows map the same x_T (monitor.py)
                x0 = teacher_samples(Ticking(self.teacher.model, shown), (self.n, *self.teacher.sample_shape),
                                     steps_teacher, self._generator(), self.teacher.condition_for(self.inputs),
                                     self.device, t_start=info.t_max)  # fmt: skip
                self.teacher_row = to_uint8(self.teacher.decode(x0))
            rows = {f"teacher, {steps_teacher} steps": self.teacher_row}
            for steps in (2, 1):
                rows[f"student (EMA), {steps} step{'s' * (steps > 1)}"] = self.teacher.student_images(
                    student.network, info, self.inputs, steps, self._generator())
                shown.update(steps)
        if save:
            self.image = labelled_rows(rows, columns=self.n)
            save_png(self.image, path)
        two_step = rows["student (EMA), 2 steps"]
        return paired_distance(images01(two_step), images01(self.teacher_row))


def sampler_info(config: DistillConfig, student: Student, **facts) -> ExportInfo:
    """The student's sampler as the export takes it: requested times, sigma_d, prediction, and the card's facts."""
    t_max, t_mid = sampling_times(config.sampling, student.model)
    base = config.export.base_model_id or (config.teacher if is_hub_id(config.teacher) else None)
    return ExportInfo(sigma_data=student.model.sigma_d, t_max=t_max, t_mid=t_mid, prediction=student.model.prediction,
                      base_model=base, **facts)  # fmt: skip


def ema_samples(config: DistillConfig, teacher: Teacher, ema: Student) -> torch.Tensor:
    """Two 2-step images of the EMA student's pipeline, [0, 1] floats (checked finite before the export)."""
    generator = torch.Generator().manual_seed(config.train.seed)
    return teacher.student_float_images(ema.network, sampler_info(config, ema), teacher.sample_inputs(2, generator),
                                        2, torch.Generator().manual_seed(config.train.seed))  # fmt: skip


def export_student(config: DistillConfig, teacher: Teacher, student: Student, export_dir: Path, run_dir: Path,
                   state: RunState, convert_steps: int, world: int, checkpoint: str | None = None,
                   grid_step: int | None = None) -> Path:  # fmt: skip
    """Export the EMA student with the run's facts (the steps it actually trained, the checkpoint) in the model
    card, with the sample grid of `grid_step` (default: the last grid)."""
    grids = sorted((run_dir / "samples").glob("*.png")) if (run_dir / "samples").is_dir() else []
    if grid_step is not None:
        grids = [g for g in grids if g.name == f"{checkpoint_name(grid_step)}.png"]
    batch = config.train.batch_size * world
    facts = {
        "teacher": config.export.base_model_id or Path(config.teacher).name,
        "data": Path(config.data.spec).name if Path(config.data.spec).exists() else config.data.spec,
        "conversion steps x batch": f"{min(state.step, convert_steps)} x {batch}",
        "sCD steps x batch": f"{max(state.step - convert_steps, 0)} x {batch}",
        "training time": f"{state.train_seconds / 60:.1f} min",
        "skipped (non-finite) steps": state.skipped_total,
        "optimizer": f"{config.optim.name}, lr {learning_rate_text(config, batch)}, betas {list(config.optim.betas)}",
        "EMA half-life": f"{config.train.ema_halflife_kimg} kimg",
        "sampler": f"t_mid {config.sampling.t_mid}, sigma_max {config.sampling.sigma_max}",
    }
    if checkpoint:
        facts["exported checkpoint"] = checkpoint
    if state.best_distance is not None:
        facts["collapse monitor, best distance (RMS px)"] = f"{state.best_distance:.4f} at step {state.best_step}"
    info = sampler_info(config, student, license=teacher_license(teacher), card_facts=facts,
                        sample_grid=grids[-1] if grids else None)  # fmt: skip
    return export_pipeline(teacher, student.network, export_dir, info)


def learning_rate_text(config: DistillConfig, global_batch: int) -> str:
    o = config.optim
    text = f"{o.lr * global_batch:g} (scale_lr: {o.lr:g} x batch {global_batch})" if o.scale_lr else f"{o.lr:g}"
    return f"{text}, {o.decay} schedule" + (f", {o.warmup_steps} warmup steps" if o.warmup_steps else "")
