"""The distillation run on accelerate: set-up helpers, then one training loop with no math in it.

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


def distill(config: DistillConfig, resume: str | None = None, overwrite: bool = False,
            teacher: Teacher | None = None, trust_remote_code: bool = False,
            layout: Layout = RUN_LAYOUT, data=None) -> DistillResult:  # fmt: skip
    """Run sCD for `config` and export the EMA student to OUTPUT/pipeline. See the module docstring. `data`: image
    tensors or a torch Dataset instead of config.data (scm_distill.data.python_data)."""
    config = launcher_settings(config, os.environ)  # what the recipe leaves unset comes from accelerate launch
    check_launcher(os.environ, config.train.parallel)
    check_tracker(config.train.report_to)
    # cpu=True without CUDA: under torchrun that is accelerate's multi-CPU (gloo) mode, not N independent runs
    # find_unused_parameters: the conversion loss does not use the logvar head (DDP fails at step 2 otherwise)
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                              **accelerator_trackers(config))  # fmt: skip
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    teacher, data = setup(config, accelerator.device, world, teacher, trust_remote_code, data)
    train = config.train
    if train.activation_checkpointing:
        check_activation_checkpointing(teacher.model.network)
    student = make_student(config, teacher).to(accelerator.device)
    teacher.check_student(student.model.prediction)
    check_initial_weights(student)
    ema = EMA(student)
    fingerprint = run_fingerprint(config, teacher, student)
    if train.activation_checkpointing:
        enable_activation_checkpointing(student.network)  # after the EMA copy: only the trained student recomputes
    storage = SHARDED if train.parallel == "fsdp" else REPLICATED  # how checkpoints hold the weights
    sharding = Sharding(accelerator.device, world, train.mixed_precision) if storage == SHARDED and world > 1 else None
    if sharding:
        sharding.shard(student, ema.module, teacher.model.network)
    optimizer = make_optimizer([p for p in student.parameters() if p.requires_grad], config.optim)
    check_output(config, resume, overwrite, layout)
    accum = train.grad_accum_steps
    convert_steps = train.convert_steps if student.model.prediction != teacher.model.prediction else 0
    total = convert_steps + train.max_steps
    state, resumes = RunState(), []
    if resume:
        checkpoint, saved = resume_from(Path(config.output), resume, storage, world, accum, student, ema, optimizer,
                                        fingerprint)  # fmt: skip
        state = run_state(saved, checkpoint)
        check_stop_step(checkpoint, state, total)
        resumes = saved.get("resumes", []) + [{"step": state.step, "changes": resumable_changes(saved, config)}]
    facts = {"fingerprint": fingerprint, "resumable": resumable_config(config), "resumes": resumes,
             "layout": storage, "virtual_ranks": world * accum}  # the last two read by check_resume  # fmt: skip
    note = single_process_note(train.parallel, world)
    if note and main:
        print(note, file=sys.stderr)
    accelerator.wait_for_everyone()
    run_dir, lock = Path(config.output), None
    if main:  # everything above only read; from here on the run folder is written, by this process alone
        make_output_folder(run_dir)
        lock = RunLock(run_dir).acquire()
    try:
        if main:
            start_run_dir(config, resume is not None, overwrite, layout)
            truncate_log(run_dir / "log.jsonl", state.step)
            start_trackers(accelerator, config)
        accelerator.wait_for_everyone()
        student_ddp, optimizer = (student, optimizer) if storage == SHARDED else accelerator.prepare(student, optimizer)
        dropout = SeededDropout(student.model.network) if config.student.dropout > 0 else None
        losses = {"convert": FRegressionLoss(teacher.model, config.objective),
                  "scd": SCDLoss(teacher.model, config.objective)}  # fmt: skip
        sample_here = main or sharding is not None  # sharded models sample on every process
        grids = SampleGrids(config, teacher, accelerator.device) if sample_here and train.sample_every > 0 else None
        order = StepBatches(len(data), state.step, total, train.batch_size, train.seed, rank, world, accum)
        loader = torch.utils.data.DataLoader(data, batch_sampler=order, collate_fn=collate,
                                             num_workers=train.num_workers)  # fmt: skip
        desc = f"distill ({convert_steps} conversion + {train.max_steps} sCD steps)" if convert_steps else \
            f"distill ({train.max_steps} sCD steps)"  # fmt: skip
        bar = tqdm(total=total, initial=state.step, disable=not main, desc=desc, dynamic_ncols=True,
                   mininterval=1 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s, not every step
        shown_loss, started = math.nan, time.time() - state.train_seconds
        last_logged = (state.samples_seen, state.train_seconds)  # for samples per second between log records

        def save(at: RunState, name: str | None = None) -> None:
            """A checkpoint of the step (pruned to the newest keep_checkpoints), or the named one (`best`, kept)."""
            folder = run_dir / "checkpoints" / (name or checkpoint_name(at.step))
            if storage == SHARDED:
                save_sharded_checkpoint(folder, student, ema, optimizer, {**vars(at), **facts}, main)
            elif main:
                save_checkpoint(folder, student.state_dict(), ema.state_dict(), optimizer.state_dict(),
                                {**vars(at), **facts})  # fmt: skip
            if main and name is None:
                prune_checkpoints(run_dir, train.keep_checkpoints)

        def watch(distance: float) -> None:
            """The collapse monitor's verdict on a measurement: keep the best checkpoint, warn on degradation."""
            if math.isfinite(distance) and (state.best_distance is None or distance < state.best_distance):
                state.best_distance, state.best_step, state.degraded = distance, state.step, False
                save(state, BEST)
            elif degraded(distance, state.best_distance):
                if not state.degraded and main:
                    tqdm.write(warning_line(distance, state.best_distance, state.best_step, state.step),
                               file=sys.stderr)  # fmt: skip
                state.degraded = True
            else:
                state.degraded = False

        log = open(run_dir / "log.jsonl", "a") if main else None  # noqa: SIM115 - closed in the finally below
        try:
            for batches in grouped(checked_batches(loader), accum):
                step = state.step
                phase = "convert" if step < convert_steps else "scd"
                if step == convert_steps > 0:
                    ema.reset(student)  # the conversion is a warm start: the EMA averages sCD weights only
                lr = learning_rate(step - convert_steps, config.optim, converting=phase == "convert",
                                   total_steps=train.max_steps, global_batch=train.batch_size * world * accum)
                micro_losses = []
                for micro, batch in enumerate(batches):
                    seed_rank = virtual_rank(rank, micro, accum)
                    generator = torch.Generator().manual_seed(step_seed(train.seed, seed_rank, step))
                    if config.data.random_flip:
                        batch = {**batch, "image": random_flip(batch["image"], generator)}
                    x0, condition = teacher.prepare_batch(batch, generator)
                    same_masks = dropout.step(dropout_seed(train.seed, seed_rank, step), accelerator.device) \
                        if dropout else nullcontext()  # both passes of the step draw the same dropout masks
                    with same_masks, gradient_sync(student_ddp, last_micro_batch=micro == accum - 1):
                        with accelerator.autocast():
                            loss, _ = losses[phase](student, student_ddp, x0, condition, step - convert_steps,
                                                    generator)  # fmt: skip
                        loss = loss.mean()
                        accelerator.backward(loss / accum)
                    micro_losses.append(loss.detach())
                loss = torch.stack(micro_losses).mean()  # a non-finite micro-batch makes the step's loss non-finite
                grad_norm = clip_grad_norm(student_ddp.parameters(), train_clip(config))  # the same on every rank
                loss_value = accelerator.reduce(loss, "mean").item()
                finite = math.isfinite(loss_value) and math.isfinite(float(grad_norm))
                if finite:
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.step()
                    global_batch = train.batch_size * world * accum
                    state.samples_seen += global_batch
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
                distance = None
                if grids and (state.step % train.sample_every == 0 or state.step == total):
                    distance = grids.write(ema.module, run_dir / "samples" / f"{checkpoint_name(state.step)}.png",
                                           save=main)  # fmt: skip
                    watch(distance)
                if log and (state.step % train.log_every == 0 or state.step == total or distance is not None):
                    record = {"step": state.step, "phase": phase, "loss": loss_value, "grad_norm": float(grad_norm),
                              "lr": lr, "skipped": state.skipped_total,
                              "seconds": round(state.train_seconds, 3)}  # fmt: skip
                    seconds = state.train_seconds - last_logged[1]
                    if seconds > 0:
                        record["samples_per_second"] = round((state.samples_seen - last_logged[0]) / seconds, 2)
                    last_logged = (state.samples_seen, state.train_seconds)
                    if distance is not None:
                        record["monitor"] = distance if math.isfinite(distance) else None
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    log_record(accelerator, record)
                if distance is not None and main:
                    log_grid(accelerator, grids.image, state.step)
                if checkpoint_now:
                    save(state)
                    if main:
                        write_loss_plot(run_dir)
                    accelerator.wait_for_everyone()
        except KeyboardInterrupt:
            raise Interrupted(interrupted_sentence(run_dir, state.step)) from None
        except DataError as error:
            save(state)  # the step that failed had not started: the state is that of the last completed step
            raise UserError(f"{error} The run is saved at step {state.step}: fix the data, then continue with "
                            f"--resume latest.") from None  # fmt: skip
        finally:
            bar.close()
            if log:
                log.close()
                write_loss_plot(run_dir)
                finish_trackers(accelerator)

        export_dir = run_dir / "pipeline"
        check_weights({"student": student}, state.step)  # a collective when sharded: every rank checks
        exported = sharding.full(ema.module, main) if sharding else ema.module  # sharded: gathered to the main CPU
        if main:
            label, grid_step = f"last (step {state.step})", None
            if config.export.checkpoint == BEST:  # the collapse monitor's best EMA (monitor.py) and its grid
                best = run_dir / "checkpoints" / BEST
                exported = with_weights(exported, checkpoint_weights(best), f"checkpoint '{best}'")
                label = f"best by the collapse monitor (step {state.best_step} of {state.step})"
                grid_step = state.best_step
            check_weights({"EMA student": exported}, state.step)
            check_samples(ema_samples(config, teacher, exported), state.step)
            export_student(config, teacher, exported, export_dir, run_dir, state, convert_steps, world * accum,
                           checkpoint=label, grid_step=grid_step)  # fmt: skip
        accelerator.wait_for_everyone()
        return DistillResult(run_dir, export_dir, student, exported if main else ema.module, state, main)
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


def train_clip(config: DistillConfig) -> float:
    return config.optim.grad_clip if config.optim.grad_clip is not None else math.inf


