"""Gradient accumulation as virtual ranks: micro-batch m of rank r is the batch of rank r * N + m of N x the ranks.

With N = train.grad_accum_steps, the optimizer steps once per N micro-batches of `batch_size`. Micro-batch m of
rank r at step s draws its items with `batch_indices(s, batch_size, ..., rank=r * N + m, world_size=world * N)` and
its noise from the seed of that virtual rank, so a run on W processes with N micro-batches is the same run (same
items, same noise, same global batch) as one on W * N processes without accumulation, and its items at each step are
those of the batch_size * N batch of each rank. That is what lets a checkpoint resume on another number of processes
(keeping processes x N) with the losses of the uninterrupted run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .data import batch_indices


# Virtual rank of micro-batch `micro` of rank `rank` with N micro-batches per step (N = 1: the rank itself).
def virtual_rank(rank: int, micro: int, accum_steps: int) -> int:
    return rank * accum_steps + micro


def micro_batch_indices(step: int, micro: int, batch_size: int, accum_steps: int, num_items: int, seed: int,
                        rank: int, world: int) -> torch.Tensor:  # fmt: skip
    """Items of micro-batch `micro` of rank `rank` at optimizer step `step` (a pure function of its arguments)."""
    return batch_indices(step, batch_size, num_items, seed, virtual_rank(rank, micro, accum_steps),
                         world * accum_steps)  # fmt: skip


def grouped(batches: Iterable, size: int) -> Iterator[list]:
    """Consecutive groups of `size` items (the micro-batches of one optimizer step); a short tail is dropped."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def gradient_sync(model: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces gradients only on the last micro-batch (no_sync before it); FSDP2 and single-process modules
    have no no_sync, and FSDP2 reduce-scatters every micro-batch into sharded gradients (memory stays sharded)."""
    no_sync = getattr(model, "no_sync", None)
    return contextlib.nullcontext() if last_micro_batch or no_sync is None else no_sync()
