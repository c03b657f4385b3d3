"""The one training loop every teacher (and the VAEs) runs, its timing, and the atomic, fsynced folder writer.

The loop holds no math: a family gives `loss_fn(net, batch, generator) -> per-sample loss [B]` and `batch_fn(step)
-> batch`; the loop reduces, steps Adam (linear warm-up, then 1/sqrt decay after `decay_after` steps, as
examples/train_teacher.py), keeps an EMA (half-life in samples, EDM convention; scm_distill.ema) and times the run
in wall and process CPU minutes (the machine is shared, so wall time is inflated by other jobs).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from scm_distill.checkpoint import atomic_directory
from scm_distill.ema import EMA, ema_beta


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation of one model."""

    steps: int  # optimizer steps
    batch_size: int  # samples per step
    lr: float  # peak Adam learning rate
    warmup_steps: int = 200  # linear warm-up from 0
    decay_after: int = 2000  # lr x 1/sqrt(step / decay_after) beyond this step
    ema_halflife_kimg: float = 20.0  # EMA half-life in thousands of samples (ramped up to 10% of samples seen)
    grad_clip: float = 1.0  # max global gradient norm
    log_every: int = 200  # steps between progress lines


@dataclass
class TrainResult:
    """What the loop measured."""

    ema: torch.nn.Module  # the EMA weights (what is saved)
    final_loss: float  # mean loss of the last log_every steps
    wall_minutes: float
    cpu_minutes: float  # process CPU time (user + system), all threads


def machine() -> str:
    """Where a run ran (the thread count matters: on an oversubscribed machine one thread is several times faster
    than two, which spin-wait for each other)."""
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def cpu_minutes() -> float:
    """Process CPU time so far (user + system, all threads), minutes."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) / 60


# Linear warm-up to `peak`, constant, then 1/sqrt decay past `decay_after` steps.
def learning_rate(step: int, settings: TrainSettings) -> float:
    warm = min(1.0, (step + 1) / settings.warmup_steps)
    return settings.lr * warm / math.sqrt(max(step / settings.decay_after, 1.0))


def train(net: torch.nn.Module, loss_fn: Callable, batch_fn: Callable, settings: TrainSettings, seed: int,
          name: str) -> TrainResult:  # fmt: skip
    """Train `net` in place for settings.steps steps; returns its EMA and the run's measurements."""
    net.train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=settings.lr, betas=(0.9, 0.999))
    ema = EMA(net)
    generator = torch.Generator().manual_seed(seed)
    started, cpu_started, losses = time.time(), cpu_minutes(), []
    for step in range(settings.steps):
        loss = loss_fn(net, batch_fn(step), generator).mean()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
        optimizer.step()
        seen = (step + 1) * settings.batch_size
        ema.update(net, ema_beta(settings.batch_size, seen, settings.ema_halflife_kimg, 0.1))
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"error: the {name} loss became {losses[-1]} at step {step}; lower --lr.")
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            recent = losses[-settings.log_every :]
            print(f"{name} step {step + 1}/{settings.steps} loss {sum(recent) / len(recent):.4f} "
                  f"({(time.time() - started) / 60:.1f} min)", flush=True)  # fmt: skip
    recent = losses[-settings.log_every :]
    return TrainResult(ema.module, sum(recent) / max(1, len(recent)), (time.time() - started) / 60,
                       cpu_minutes() - cpu_started)  # fmt: skip


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves (so the rename that follows is durable)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def output_folder(final: Path, overwrite: bool):
    """A temporary sibling folder to write into; fsynced and renamed to `final` on success, removed on error."""
    with atomic_directory(final, overwrite=overwrite) as tmp:
        yield tmp
        fsync_tree(tmp)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def refuse_existing(out: Path, overwrite: bool) -> None:
    """One-sentence exit before any work when the output exists and --overwrite was not given."""
    if out.exists() and not overwrite:
        raise SystemExit(f"error: output '{out}' exists; pass --overwrite to replace it.")
