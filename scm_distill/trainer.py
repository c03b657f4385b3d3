"""The distillation run on accelerate: set-up helpers, then one training loop with no math in it.

Works unchanged in one CPU process, on one GPU and under `accelerate launch` (DDP). The JVP runs on the
unwrapped student (through the DDP wrapper torch.func.jvp breaks on the second step); the gradient pass goes
through the wrapper. Every step re-seeds its randomness (dropout included) from (seed, rank, step) and draws its
batch from a pure function of the step, so `--resume latest` continues with exactly the losses of an
uninterrupted run. Everything that can be checked (config, teacher, data, student, optimizer, output folder,
checkpoint fingerprint) is checked before the run folder is touched; the folder is locked while the run trains.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import (
    check_state_dict,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    load_newest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .config import DistillConfig
from .data import ImageSet, batch_indices, collate, load_images
from .ema import EMA, ema_beta
from .errors import Interrupted, NonFiniteError, UserError
from .export.pipeline import export_pipeline
from .families import ExportInfo, Teacher, load_teacher
from .files import write_atomic
from .fingerprint import check_fingerprint, resumable_changes, resumable_config, run_fingerprint
from .finite import check_initial_weights, check_samples, check_weights
from .generate import sampling_times, teacher_samples
from .grids import labelled_rows, save_png, to_uint8
from .objective import FRegressionLoss, SCDLoss
from .optim import learning_rate, make_optimizer
from .run_dir import RUN_LAYOUT, Layout, check_output, make_output_folder, start_run_dir
from .run_lock import RunLock
from .seeded_dropout import SeededDropout, dropout_seed
from .student import Student, low_pass_time_embedding

__all__ = ["DistillResult", "NonFiniteError", "distill"]


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of one process's randomness at one optimizer step (resume-exact, distinct across ranks)."""
    return (seed * 1_000_003 + step) * 1_009 + rank


class StepBatches:
    """Batch sampler: the indices of steps start..total-1 of one rank, computed lazily from the step number."""

    def __init__(self, num_items: int, start: int, total: int, batch_size: int, seed: int, rank: int, world: int):
        self.num_items, self.start, self.total = num_items, start, total
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self):
        for step in range(self.start, self.total):
            yield batch_indices(step, self.batch_size, self.num_items, self.seed, self.rank, self.world).tolist()


@dataclass
class RunState:
    """Counters saved with each checkpoint."""

    step: int = 0
    samples_seen: int = 0
    skipped_total: int = 0
    skipped_in_a_row: int = 0
    train_seconds: float = 0.0


def setup(config: DistillConfig, accelerator: Accelerator, teacher: Teacher | None,
          trust_remote_code: bool = False) -> tuple[Teacher, ImageSet]:  # fmt: skip
    """Load and check the teacher and the data (before the output folder is touched)."""
    if teacher is None:
        teacher = load_teacher(config.teacher, config.sigma_data, accelerator.device,
                               trust_remote_code=trust_remote_code)  # fmt: skip
    teacher.configure(config)
    data = load_images(config.data.spec, split=config.data.split, resize_to=config.data.resize_to,
                       pad_to=config.data.pad_to, max_items=config.data.max_items)  # fmt: skip
    teacher.prepare(data)  # checks that the data fits the teacher first (a small data set is cheap to prepare)
    global_batch = config.train.batch_size * accelerator.num_processes
    if len(data) < global_batch:
        raise UserError(f"data '{data.name}' has {len(data)} images, fewer than one batch of {global_batch} "
                        f"(train.batch_size x {accelerator.num_processes} processes); lower --batch-size.")  # fmt: skip
    return teacher, data


def make_student(config: DistillConfig, teacher: Teacher) -> Student:
    prediction = None if config.student.prediction == "auto" else config.student.prediction
    model = teacher.student_model(prediction, config.student.dropout)
    if config.student.time_embedding_max_frequency is not None:
        low_pass_time_embedding(model.network, config.student.time_embedding_max_frequency)
    return Student(model, config.student.logvar_channels)


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
    try:
        return RunState(**{k: state[k] for k in RunState.__dataclass_fields__})
    except KeyError as error:
        raise UserError(f"checkpoint '{checkpoint}' has a state.json without '{error.args[0]}'.") from None


def check_stop_step(checkpoint: Path, state: RunState, total: int) -> None:
    if state.step > total:
        raise UserError(f"checkpoint '{checkpoint}' is at step {state.step}, beyond the {total} steps this run is set "
                        f"to (conversion + train.max_steps); pass a larger --max-steps.")  # fmt: skip


class SampleGrids:
    """Teacher vs student samples on fixed noise, written every `sample_every` steps."""

    def __init__(self, config: DistillConfig, teacher: Teacher, device: torch.device):
        self.config, self.teacher, self.device = config, teacher, device
        self.n = config.sampling.grid_size
        self.shape = (self.n, *teacher.sample_shape)
        self.condition = teacher.sample_condition(self.n, torch.Generator().manual_seed(config.train.seed))
        self.teacher_row = None

    def _generator(self) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.config.train.seed)

    def write(self, student: Student, path: Path) -> Path:
        cfg = self.config.sampling
        t_max, t_mid = sampling_times(cfg, student.model)
        if self.teacher_row is None:
            x0 = teacher_samples(self.teacher.model, self.shape, cfg.teacher_steps, self._generator(),
                                 self.condition, self.device)  # fmt: skip
            self.teacher_row = to_uint8(self.teacher.decode(x0))
        rows = {f"teacher, {cfg.teacher_steps} steps": self.teacher_row}
        for steps in (2, 1):
            x0 = self.teacher.consistency_samples(student.model, self.shape, steps, t_max, t_mid, self._generator(),
                                                  self.condition, self.device)  # fmt: skip
            rows[f"student (EMA), {steps} step{'s' * (steps > 1)}"] = to_uint8(self.teacher.decode(x0))
        return save_png(labelled_rows(rows, columns=self.n), path)


@dataclass
class DistillResult:
    run_dir: Path
    export_dir: Path
    student: Student  # this process's trained (unwrapped) student
    ema: Student  # the EMA student, the exported weights
    state: RunState


def distill(config: DistillConfig, resume: str | None = None, overwrite: bool = False,
            teacher: Teacher | None = None, trust_remote_code: bool = False,
            layout: Layout = RUN_LAYOUT) -> DistillResult:  # fmt: skip
    """Run sCD for `config` and export the EMA student to OUTPUT/pipeline. See the module docstring."""
    # cpu=True without CUDA: under torchrun that is accelerate's multi-CPU (gloo) mode, not N independent runs
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision, cpu=not torch.cuda.is_available())
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    teacher, data = setup(config, accelerator, teacher, trust_remote_code)
    student = make_student(config, teacher).to(accelerator.device)
    teacher.check_student(student.model.prediction)
    check_initial_weights(student)
    ema = EMA(student)
    optimizer = make_optimizer([p for p in student.parameters() if p.requires_grad], config.optim)
    fingerprint = run_fingerprint(config, teacher, student)
    check_output(config, resume, overwrite, layout)
    train = config.train
    convert_steps = train.convert_steps if student.model.prediction != teacher.model.prediction else 0
    total = convert_steps + train.max_steps
    state, resumes = RunState(), []
    if resume:
        checkpoint, contents = read_resume_checkpoint(Path(config.output), resume)
        state = restore(checkpoint, contents, student, ema, optimizer, fingerprint)
        check_stop_step(checkpoint, state, total)
        resumes = contents[3].get("resumes", []) + [{"step": state.step,
                                                      "changes": resumable_changes(contents[3], config)}]  # fmt: skip
    facts = {"fingerprint": fingerprint, "resumable": resumable_config(config), "resumes": resumes}
    accelerator.wait_for_everyone()
    run_dir, lock = Path(config.output), None
    if main:  # everything above only read; from here on the run folder is written, by this process alone
        make_output_folder(run_dir)
        lock = RunLock(run_dir).acquire()
    try:
        if main:
            start_run_dir(config, resume is not None, overwrite, layout)
            truncate_log(run_dir / "log.jsonl", state.step)
        accelerator.wait_for_everyone()
        student_ddp, optimizer = accelerator.prepare(student, optimizer)
        dropout = SeededDropout(student.model.network) if config.student.dropout > 0 else None
        losses = {"convert": FRegressionLoss(teacher.model, config.objective),
                  "scd": SCDLoss(teacher.model, config.objective)}  # fmt: skip
        grids = SampleGrids(config, teacher, accelerator.device) if main and train.sample_every > 0 else None
        order = StepBatches(len(data), state.step, total, train.batch_size, train.seed, rank, world)
        loader = torch.utils.data.DataLoader(data, batch_sampler=order, collate_fn=collate,
                                             num_workers=train.num_workers)  # fmt: skip
        bar = tqdm(total=total, initial=state.step, disable=not main, desc="distill", dynamic_ncols=True,
                   mininterval=1 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s, not every step
        shown_loss, started = math.nan, time.time() - state.train_seconds

        def save(at: RunState) -> None:
            save_checkpoint(run_dir / "checkpoints" / checkpoint_name(at.step), student.state_dict(),
                            ema.state_dict(), optimizer.state_dict(), {**vars(at), **facts})  # fmt: skip
            prune_checkpoints(run_dir, train.keep_checkpoints)

        log = open(run_dir / "log.jsonl", "a") if main else None  # noqa: SIM115 - closed in the finally below
        try:
            for batch in checked_batches(loader):
                step = state.step
                phase = "convert" if step < convert_steps else "scd"
                if step == convert_steps > 0:
                    ema.reset(student)  # the conversion is a warm start: the EMA averages sCD weights only
                lr = learning_rate(step - convert_steps, config.optim, converting=phase == "convert")
                generator = torch.Generator().manual_seed(step_seed(train.seed, rank, step))
                x0, condition = teacher.prepare_batch(batch, generator)
                same_masks = dropout.step(dropout_seed(train.seed, rank, step), accelerator.device) if dropout else None
                with same_masks or nullcontext():  # both passes of the step draw the same dropout masks
                    with accelerator.autocast():
                        loss, _ = losses[phase](student, student_ddp, x0, condition, step - convert_steps, generator)
                    loss = loss.mean()
                    accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(student_ddp.parameters(), train_clip(config))
                loss_value = accelerator.reduce(loss.detach(), "mean").item()
                finite = math.isfinite(loss_value) and math.isfinite(float(grad_norm))
                if finite:
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.step()
                    state.samples_seen += train.batch_size * world
                    global_batch = train.batch_size * world
                    ramp = state.samples_seen - (convert_steps * global_batch if phase == "scd" else 0)  # sCD samples
                    ema.update(student, ema_beta(global_batch, ramp, train.ema_halflife_kimg, train.ema_rampup_ratio))
                    state.skipped_in_a_row = 0
                else:
                    state.skipped_total += 1
                    state.skipped_in_a_row += 1
                    if state.skipped_in_a_row >= train.max_nonfinite_in_a_row:
                        raise NonFiniteError(f"{state.skipped_in_a_row} steps in a row had a non-finite loss or "
                                             f"gradient (at step {step}); resume from the last checkpoint with a "
                                             f"lower --set optim.lr=... or check the teacher and data.")  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                state.step = step + 1
                state.train_seconds = time.time() - started
                checkpoint_now = (train.checkpoint_every and state.step % train.checkpoint_every == 0) or \
                    state.step == total
                if state.step % train.log_every == 0 or checkpoint_now:
                    check_weights({"student": student, "EMA student": ema.module}, state.step)

                shown_loss = loss_value if math.isnan(shown_loss) or not finite else 0.9 * shown_loss + 0.1 * loss_value
                bar.set_postfix(phase=phase, loss=f"{shown_loss:.4f}", skipped=state.skipped_total, refresh=False)
                bar.update(1)
                if log and (state.step % train.log_every == 0 or state.step == total):
                    record = {"step": state.step, "phase": phase, "loss": loss_value, "grad_norm": float(grad_norm),
                              "lr": lr, "skipped": state.skipped_total,
                              "seconds": round(state.train_seconds, 3)}  # fmt: skip
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if grids and (state.step % train.sample_every == 0 or state.step == total):
                    grids.write(ema.module, run_dir / "samples" / f"{checkpoint_name(state.step)}.png")
                if checkpoint_now:
                    if main:
                        save(state)
                    accelerator.wait_for_everyone()
        except KeyboardInterrupt:
            raise Interrupted(interrupted_sentence(run_dir, state.step)) from None
        except DataError as error:
            if main:  # the step that failed had not started: the state is that of the last completed step
                save(state)
            raise UserError(f"{error} The run is saved at step {state.step}: fix the data, then continue with "
                            f"--resume latest.") from None  # fmt: skip
        finally:
            bar.close()
            if log:
                log.close()

        export_dir = run_dir / "pipeline"
        if main:
            check_weights({"student": student, "EMA student": ema.module}, state.step)
            check_samples(ema_samples(config, teacher, ema.module, accelerator.device), state.step)
            export_student(config, teacher, ema.module, export_dir, run_dir, state, convert_steps, world)
        accelerator.wait_for_everyone()
        return DistillResult(run_dir, export_dir, student, ema.module, state)
    finally:
        if lock:
            lock.release()


class DataError(UserError):
    """An image the data loader could not read in the middle of a run."""


def checked_batches(loader):
    """The loader's batches; an unreadable image (UserError, also from a worker process) becomes a DataError."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except UserError as error:
            text = str(error).strip()
            if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the original sentence
                text = text.splitlines()[-1].split(": ", 1)[-1]
            raise DataError(text) from None
        yield batch


def interrupted_sentence(run_dir: Path, step: int) -> str:
    saved = list_checkpoints(run_dir)
    if saved:
        return f"interrupted at step {step}; continue from {saved[-1].name} with --resume latest."
    return f"interrupted at step {step}, before the first checkpoint; rerun with --overwrite to start over."


def ema_samples(config: DistillConfig, teacher: Teacher, ema: Student, device: torch.device) -> torch.Tensor:
    """Two 2-step samples of the EMA student, in the model's space (checked finite before the export)."""
    t_max, t_mid = sampling_times(config.sampling, ema.model)
    condition = teacher.sample_condition(2, torch.Generator().manual_seed(config.train.seed))
    return teacher.consistency_samples(ema.model, (2, *teacher.sample_shape), 2, t_max, t_mid,
                                       torch.Generator(device).manual_seed(config.train.seed), condition, device)


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


def train_clip(config: DistillConfig) -> float:
    return config.optim.grad_clip if config.optim.grad_clip is not None else math.inf


def export_student(config: DistillConfig, teacher: Teacher, student: Student, export_dir: Path, run_dir: Path,
                   state: RunState, convert_steps: int, world: int) -> Path:  # fmt: skip
    """Export the EMA student with the run's facts (the steps it actually trained) in the model card."""
    t_max, t_mid = sampling_times(config.sampling, student.model)
    grids = sorted((run_dir / "samples").glob("*.png")) if (run_dir / "samples").is_dir() else []
    batch = config.train.batch_size * world
    facts = {
        "teacher": config.teacher,
        "data": config.data.spec,
        "conversion steps x batch": f"{min(state.step, convert_steps)} x {batch}",
        "sCD steps x batch": f"{max(state.step - convert_steps, 0)} x {batch}",
        "training time": f"{state.train_seconds / 60:.1f} min",
        "skipped (non-finite) steps": state.skipped_total,
    }
    info = ExportInfo(sigma_data=config.sigma_data, t_max=t_max, t_mid=t_mid,
                      base_model=config.export.base_model_id or config.teacher, card_facts=facts,
                      sample_grid=grids[-1] if grids else None, prediction=student.model.prediction)  # fmt: skip
    return export_pipeline(teacher, student.network, export_dir, info)
