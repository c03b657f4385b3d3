"""The distillation run on accelerate: `prepare` (every check, nothing written), one training loop with no math in
it, `export`.

Works unchanged in one CPU process, on one GPU and under `accelerate launch` (DDP, or FSDP2 with
`train.parallel: fsdp`, parallel.py). The JVP runs on the unwrapped student (through the DDP wrapper torch.func.jvp
breaks on the second step; a sharded student is its own module); the gradient pass goes through the wrapper. Every
micro-batch re-seeds its randomness (dropout included) from (seed, virtual rank, step) and draws its batch from a
pure function of the step (accumulation.py), so `--resume latest` continues with exactly the losses of an
uninterrupted run. Everything that can be checked (config, teacher, data, student, optimizer, output folder,
checkpoint fingerprint) is checked before the run folder is touched; the folder is locked while the run trains.
Every `train.sample_every` steps the sample grid also measures the collapse monitor (monitor.py), which keeps the
best checkpoint in checkpoints/best; log records go to log.jsonl, the trackers and loss.png (tracking.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from tqdm.auto import tqdm

from .accumulation import gradient_sync, grouped, virtual_rank
from .checkpoint import (
    checkpoint_name,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
)
from .config import DistillConfig
from .data import ImageSet, as_image_set, batch_indices, collate, load_images
from .data.transforms import random_flip
from .ema import EMA, ema_beta
from .errors import Interrupted, NonFiniteError, UserError
from .families import Teacher, load_teacher
from .fingerprint import resumable_changes, resumable_config, run_fingerprint
from .finite import check_initial_weights, check_samples, check_weights
from .monitor import degraded, warning_line
from .objective import FRegressionLoss, SCDLoss
from .optim import learning_rate, make_optimizer
from .parallel import (
    Sharding,
    check_activation_checkpointing,
    check_launcher,
    clip_grad_norm,
    enable_activation_checkpointing,
    launcher_settings,
    single_process_note,
)
from .resume import RunState, check_stop_step, resume_from, run_state, truncate_log
from .run_dir import RUN_LAYOUT, Layout, check_output, make_output_folder, start_run_dir
from .run_export import BEST, checkpoint_weights, with_weights
from .run_lock import RunLock
from .run_outputs import SampleGrids, ema_samples, export_student
from .seeded_dropout import SeededDropout, dropout_seed
from .sharded_checkpoint import REPLICATED, SHARDED, save_sharded_checkpoint
from .student import Student
from .tracking import (
    accelerator_trackers,
    check_tracker,
    finish_trackers,
    log_grid,
    log_record,
    start_trackers,
    write_loss_plot,
)

__all__ = ["DistillResult", "NonFiniteError", "distill"]


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of one process's randomness at one optimizer step (resume-exact, distinct across ranks)."""
    return (seed * 1_000_003 + step) * 1_009 + rank


class StepBatches:
    """Batch sampler: the indices of the `accum` micro-batches of steps start..total-1 of one rank, computed lazily
    from the step number (micro-batch m of rank r is virtual rank r * accum + m; accumulation.py)."""

    def __init__(self, num_items: int, start: int, total: int, batch_size: int, seed: int, rank: int, world: int,
                 accum: int = 1):  # fmt: skip
        self.num_items, self.start, self.total, self.accum = num_items, start, total, accum
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world

    def __len__(self) -> int:
        return (self.total - self.start) * self.accum

    def __iter__(self):
        for step in range(self.start, self.total):
            for micro in range(self.accum):
                yield batch_indices(step, self.batch_size, self.num_items, self.seed,
                                    virtual_rank(self.rank, micro, self.accum), self.world * self.accum).tolist()


def setup(config: DistillConfig, device: torch.device, num_processes: int, teacher: Teacher | None,
          trust_remote_code: bool = False, data=None) -> tuple[Teacher, ImageSet]:  # fmt: skip
    """Load and check the teacher and the data (before the output folder is touched)."""
    if teacher is None:
        teacher = load_teacher(config.teacher, config.sigma_data, device, trust_remote_code=trust_remote_code,
                               revision=config.teacher_revision, variant=config.teacher_variant,
                               cache_dir=config.cache_dir)  # fmt: skip
    teacher.configure(config)
    data = as_image_set(data) if data is not None else \
        load_images(config.data.spec, split=config.data.split, resize_to=config.data.resize_to,
                    pad_to=config.data.pad_to, max_items=config.data.max_items,
                    image_column=config.data.image_column, caption_column=config.data.caption_column)  # fmt: skip
    teacher.prepare(data)  # checks that the data fits the teacher first (a small data set is cheap to prepare)
    global_batch = config.train.batch_size * num_processes
    if len(data) < global_batch:
        raise UserError(f"data '{data.name}' has {len(data)} images, fewer than one batch of {global_batch} "
                        f"(train.batch_size x {num_processes} processes); lower --batch-size.")  # fmt: skip
    return teacher, data


def make_student(config: DistillConfig, teacher: Teacher) -> Student:
    prediction = None if config.student.prediction == "auto" else config.student.prediction
    model = teacher.student_model(prediction, config.student.dropout)
    if config.student.time_embedding_max_frequency is not None:
        teacher.low_pass_time_embedding(model.network, config.student.time_embedding_max_frequency)
    return Student(model, config.student.logvar_channels)


@dataclass
class DistillResult:
    run_dir: Path
    export_dir: Path
    student: Student  # this process's trained (unwrapped) student
    ema: Student  # the EMA student, the exported weights
    state: RunState
    is_main: bool = True  # the main process (the one that wrote the export)


@dataclass
class Run:
    """What one run trains with, built and checked by `prepare` before its folder is written, and its counters."""

    config: DistillConfig
    accelerator: Accelerator
    teacher: Teacher
    data: ImageSet
    student: Student
    ema: EMA
    optimizer: torch.optim.Optimizer
    storage: str  # how checkpoints hold the weights: REPLICATED or SHARDED
    sharding: Sharding | None
    state: RunState
    facts: dict  # saved with every checkpoint next to the counters (fingerprint, resumable config, resumes, layout)
    convert_steps: int  # the conversion phase (an eps/x0 teacher -> a v student), 0 when the predictions agree

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output)

    @property
    def total(self) -> int:
        return self.convert_steps + self.config.train.max_steps

    @property
    def virtual_ranks(self) -> int:
        return self.accelerator.num_processes * self.config.train.grad_accum_steps

    @property
    def global_batch(self) -> int:
        return self.config.train.batch_size * self.virtual_ranks

    def save(self, name: str | None = None) -> None:
        """A checkpoint of the current step (pruned to the newest keep_checkpoints), or the named one (`best`)."""
        folder = self.run_dir / "checkpoints" / (name or checkpoint_name(self.state.step))
        meta = {**vars(self.state), **self.facts}
        if self.storage == SHARDED:
            save_sharded_checkpoint(folder, self.student, self.ema, self.optimizer, meta, self.main)
        elif self.main:
            save_checkpoint(folder, self.student.state_dict(), self.ema.state_dict(), self.optimizer.state_dict(),
                            meta)  # fmt: skip
        if self.main and name is None:
            prune_checkpoints(self.run_dir, self.config.train.keep_checkpoints)

    def watch(self, distance: float) -> None:
        """The collapse monitor's verdict on a measurement: keep the best checkpoint, warn once on degradation."""
        state = self.state
        if math.isfinite(distance) and (state.best_distance is None or distance < state.best_distance):
            state.best_distance, state.best_step, state.degraded = distance, state.step, False
            self.save(BEST)
        elif degraded(distance, state.best_distance):
            if not state.degraded and self.main:
                tqdm.write(warning_line(distance, state.best_distance, state.best_step, state.step), file=sys.stderr)
            state.degraded = True
        else:
            state.degraded = False


def distill(config: DistillConfig, resume: str | None = None, overwrite: bool = False,
            teacher: Teacher | None = None, trust_remote_code: bool = False,
            layout: Layout = RUN_LAYOUT, data=None) -> DistillResult:  # fmt: skip
    """Run sCD for `config` and export the EMA student to OUTPUT/pipeline. See the module docstring. `data`: image
    tensors or a torch Dataset instead of config.data (scm_distill.data.python_data)."""
    run = prepare(config, resume, overwrite, teacher, trust_remote_code, layout, data)
    run.accelerator.wait_for_everyone()
    lock = None
    if run.main:  # everything above only read; from here on the run folder is written, by this process alone
        make_output_folder(run.run_dir)
        lock = RunLock(run.run_dir).acquire()
    try:
        if run.main:
            start_run_dir(run.config, resume is not None, overwrite, layout)
            truncate_log(run.run_dir / "log.jsonl", run.state.step)
            start_trackers(run.accelerator, run.config)
        run.accelerator.wait_for_everyone()
        training_loop(run)
        return export(run)
    finally:
        if lock:
            lock.release()


def prepare(config: DistillConfig, resume: str | None, overwrite: bool, teacher: Teacher | None,
            trust_remote_code: bool, layout: Layout, data) -> Run:  # fmt: skip
    """Everything that can be checked, checked: the launcher, the teacher and data, the student, the sharding, the
    output folder and (on --resume) the checkpoint's fingerprint. Reads only; the run folder is not touched."""
    config = launcher_settings(config, os.environ)  # what the recipe leaves unset comes from accelerate launch
    check_launcher(os.environ, config.train.parallel)
    check_tracker(config.train.report_to)
    # cpu=True without CUDA: under torchrun that is accelerate's multi-CPU (gloo) mode, not N independent runs
    # find_unused_parameters: the conversion loss does not use the logvar head (DDP fails at step 2 otherwise)
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                              **accelerator_trackers(config))  # fmt: skip
    world, train = accelerator.num_processes, config.train
    teacher, data = setup(config, accelerator.device, world, teacher, trust_remote_code, data)
    if train.activation_checkpointing:
        check_activation_checkpointing(teacher.model.network)
    student = make_student(config, teacher).to(accelerator.device)
    teacher.check_student(student.model.prediction)
    check_initial_weights(student)
    ema = EMA(student)
    fingerprint = run_fingerprint(config, teacher, student)
    if train.activation_checkpointing:
        enable_activation_checkpointing(student.network)  # after the EMA copy: only the trained student recomputes
    storage = SHARDED if train.parallel == "fsdp" else REPLICATED
    sharding = Sharding(accelerator.device, world, train.mixed_precision) if storage == SHARDED and world > 1 else None
    if sharding:
        sharding.shard(student, ema.module, teacher.model.network)
    optimizer = make_optimizer([p for p in student.parameters() if p.requires_grad], config.optim)
    check_output(config, resume, overwrite, layout)
    convert_steps = train.convert_steps if student.model.prediction != teacher.model.prediction else 0
    state, resumes = RunState(), []
    if resume:
        checkpoint, saved = resume_from(Path(config.output), resume, storage, world, train.grad_accum_steps, student,
                                        ema, optimizer, fingerprint)  # fmt: skip
        state = run_state(saved, checkpoint)
        check_stop_step(checkpoint, state, convert_steps + train.max_steps)
        resumes = saved.get("resumes", []) + [{"step": state.step, "changes": resumable_changes(saved, config)}]
    facts = {"fingerprint": fingerprint, "resumable": resumable_config(config), "resumes": resumes,
             "layout": storage, "virtual_ranks": world * train.grad_accum_steps}  # the last two read by check_resume
    note = single_process_note(train.parallel, world)
    if note and accelerator.is_main_process:
        print(note, file=sys.stderr)
    return Run(config, accelerator, teacher, data, student, ema, optimizer, storage, sharding, state, facts,
               convert_steps)  # fmt: skip


def training_loop(run: Run) -> None:
    """The training loop: conversion steps, then sCD steps, each a `train_step`; samples, the collapse monitor, log
    records and checkpoints at their intervals. A stopped run (Ctrl-C, unreadable data) says how to continue."""
    config, train, state, accelerator = run.config, run.config.train, run.state, run.accelerator
    student_ddp, run.optimizer = (run.student, run.optimizer) if run.storage == SHARDED else \
        accelerator.prepare(run.student, run.optimizer)  # fmt: skip
    dropout = SeededDropout(run.student.model.network) if config.student.dropout > 0 else None
    losses = {"convert": FRegressionLoss(run.teacher.model, config.objective),
              "scd": SCDLoss(run.teacher.model, config.objective)}  # fmt: skip
    sample_here = run.main or run.sharding is not None  # sharded models sample on every process
    grids = SampleGrids(config, run.teacher, accelerator.device) if sample_here and train.sample_every > 0 else None
    order = StepBatches(len(run.data), state.step, run.total, train.batch_size, train.seed,
                        accelerator.process_index, accelerator.num_processes, train.grad_accum_steps)  # fmt: skip
    loader = torch.utils.data.DataLoader(run.data, batch_sampler=order, collate_fn=collate,
                                         num_workers=train.num_workers)  # fmt: skip
    desc = f"distill ({run.convert_steps} conversion + {train.max_steps} sCD steps)" if run.convert_steps else \
        f"distill ({train.max_steps} sCD steps)"  # fmt: skip
    bar = tqdm(total=run.total, initial=state.step, disable=not run.main, desc=desc, dynamic_ncols=True,
               mininterval=1 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s, not every step
    shown_loss, started = math.nan, time.time() - state.train_seconds
    last_logged = (state.samples_seen, state.train_seconds)  # for samples per second between log records
    log = open(run.run_dir / "log.jsonl", "a") if run.main else None  # noqa: SIM115 - closed in the finally below
    try:
        for batches in grouped(checked_batches(loader), train.grad_accum_steps):
            step = state.step
            phase = "convert" if step < run.convert_steps else "scd"
            if step == run.convert_steps > 0:
                run.ema.reset(run.student)  # the conversion is a warm start: the EMA averages sCD weights only
            lr = learning_rate(step - run.convert_steps, config.optim, converting=phase == "convert",
                               total_steps=train.max_steps, global_batch=run.global_batch)  # fmt: skip
            loss, grad_norm = train_step(run, student_ddp, losses[phase], dropout, batches)
            finite = apply_step(run, loss, grad_norm, lr, phase)
            state.step = step + 1
            state.train_seconds = time.time() - started
            checkpoint_now = (train.checkpoint_every and state.step % train.checkpoint_every == 0) or \
                state.step == run.total  # fmt: skip
            if state.step % train.log_every == 0 or checkpoint_now:
                check_weights({"student": run.student, "EMA student": run.ema.module}, state.step)
            shown_loss = loss if math.isnan(shown_loss) or not finite else 0.9 * shown_loss + 0.1 * loss
            bar.set_postfix(phase=phase, loss=f"{shown_loss:.4f}", skipped=state.skipped_total, refresh=False)
            bar.update(1)
            distance = None
            if grids and (state.step % train.sample_every == 0 or state.step == run.total):
                distance = grids.write(run.ema.module, run.run_dir / "samples" / f"{checkpoint_name(state.step)}.png",
                                       save=run.main)  # fmt: skip
                run.watch(distance)
            if log and (state.step % train.log_every == 0 or state.step == run.total or distance is not None):
                record = log_line(state, phase, loss, grad_norm, lr, last_logged, distance)
                last_logged = (state.samples_seen, state.train_seconds)
                log.write(json.dumps(record) + "\n")
                log.flush()
                log_record(accelerator, record)
            if distance is not None and run.main:
                log_grid(accelerator, grids.image, state.step)
            if checkpoint_now:
                run.save()
                if run.main:
                    write_loss_plot(run.run_dir)
                accelerator.wait_for_everyone()
    except KeyboardInterrupt:
        raise Interrupted(interrupted_sentence(run.run_dir, state.step)) from None
    except DataError as error:
        run.save()  # the step that failed had not started: the state is that of the last completed step
        raise UserError(f"{error} The run is saved at step {state.step}: fix the data, then continue with "
                        f"--resume latest.") from None  # fmt: skip
    finally:
        bar.close()
        if log:
            log.close()
            write_loss_plot(run.run_dir)
            finish_trackers(accelerator)


def train_step(run: Run, student_ddp: torch.nn.Module, loss_fn, dropout: SeededDropout | None,
               batches: list[dict]) -> tuple[float, float]:  # fmt: skip
    """The gradient of one optimizer step, accumulated over its micro-batches (each seeded from (seed, virtual rank,
    step)) and clipped; returns the step's mean loss over all processes and the gradient norm. A non-finite
    micro-batch makes the step's loss non-finite."""
    config, step, accum = run.config, run.state.step, run.config.train.grad_accum_steps
    rank, seed = run.accelerator.process_index, config.train.seed
    micro_losses = []
    for micro, batch in enumerate(batches):
        seed_rank = virtual_rank(rank, micro, accum)
        generator = torch.Generator().manual_seed(step_seed(seed, seed_rank, step))
        if config.data.random_flip:
            batch = {**batch, "image": random_flip(batch["image"], generator)}
        x0, condition = run.teacher.prepare_batch(batch, generator)
        same_masks = dropout.step(dropout_seed(seed, seed_rank, step), run.accelerator.device) if dropout else \
            nullcontext()  # both passes of the step draw the same dropout masks  # fmt: skip
        with same_masks, gradient_sync(student_ddp, last_micro_batch=micro == accum - 1):
            with run.accelerator.autocast():
                loss, _ = loss_fn(run.student, student_ddp, x0, condition, step - run.convert_steps, generator)
            loss = loss.mean()
            run.accelerator.backward(loss / accum)
        micro_losses.append(loss.detach())
    grad_norm = clip_grad_norm(student_ddp.parameters(), train_clip(config))  # the same on every rank
    loss = run.accelerator.reduce(torch.stack(micro_losses).mean(), "mean").item()
    return loss, float(grad_norm)


def apply_step(run: Run, loss: float, grad_norm: float, lr: float, phase: str) -> bool:
    """The optimizer and EMA update of a finite step; a non-finite one is skipped and counted (too many in a row
    stop the run). Returns whether the step was applied."""
    state, train = run.state, run.config.train
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.optimizer.step()
        state.samples_seen += run.global_batch
        ramp = state.samples_seen - (run.convert_steps * run.global_batch if phase == "scd" else 0)  # sCD samples
        run.ema.update(run.student, ema_beta(run.global_batch, ramp, train.ema_halflife_kimg, train.ema_rampup_ratio))
        state.skipped_in_a_row = 0
    else:
        state.skipped_total += 1
        state.skipped_in_a_row += 1
        if state.skipped_in_a_row >= train.max_nonfinite_in_a_row:
            raise NonFiniteError(f"{state.skipped_in_a_row} steps in a row had a non-finite loss or gradient (at step "
                                 f"{state.step}); resume from the last checkpoint with a lower --set optim.lr=... or "
                                 f"check the teacher and data.")  # fmt: skip
    run.optimizer.zero_grad(set_to_none=True)
    return finite


def log_line(state: RunState, phase: str, loss: float, grad_norm: float, lr: float, last_logged: tuple[int, float],
             distance: float | None) -> dict:  # fmt: skip
    """One log.jsonl record; samples per second since the last record (`last_logged`: its samples and seconds)."""
    record = {"step": state.step, "phase": phase, "loss": loss, "grad_norm": grad_norm, "lr": lr,
              "skipped": state.skipped_total, "seconds": round(state.train_seconds, 3)}  # fmt: skip
    seconds = state.train_seconds - last_logged[1]
    if seconds > 0:
        record["samples_per_second"] = round((state.samples_seen - last_logged[0]) / seconds, 2)
    if distance is not None:
        record["monitor"] = distance if math.isfinite(distance) else None
    return record


def export(run: Run) -> DistillResult:
    """The EMA student (or the collapse monitor's best, export.checkpoint: best), checked, written to
    OUTPUT/pipeline by the main process."""
    config, state, main = run.config, run.state, run.main
    export_dir = run.run_dir / "pipeline"
    check_weights({"student": run.student}, state.step)  # a collective when sharded: every rank checks
    exported = run.sharding.full(run.ema.module, main) if run.sharding else run.ema.module  # gathered to main's CPU
    if main:
        label, grid_step = f"last (step {state.step})", None
        if config.export.checkpoint == BEST:  # the collapse monitor's best EMA (monitor.py) and its grid
            best = run.run_dir / "checkpoints" / BEST
            exported = with_weights(exported, checkpoint_weights(best), f"checkpoint '{best}'")
            label = f"best by the collapse monitor (step {state.best_step} of {state.step})"
            grid_step = state.best_step
        check_weights({"EMA student": exported}, state.step)
        check_samples(ema_samples(config, run.teacher, exported), state.step)
        export_student(config, run.teacher, exported, export_dir, run.run_dir, state, run.convert_steps,
                       run.virtual_ranks, checkpoint=label, grid_step=grid_step)  # fmt: skip
    run.accelerator.wait_for_everyone()
    return DistillResult(run.run_dir, export_dir, run.student, exported if main else run.ema.module, state, main)


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


def train_clip(config: DistillConfig) -> float:
    return config.optim.grad_clip if config.optim.grad_clip is not None else math.inf


