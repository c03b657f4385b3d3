"""Deterministic, resumable batch order for training: a pure function of (step, seed), no sampler state.

Epoch e visits the items in the order of torch.randperm(num_items) drawn from a torch.Generator seeded with
(h(seed) + e) mod 2**32, h a 32-bit hash: torch's CPU generator keeps only the low 32 bits of a seed (so
(seed << 32) | e would ignore the seed), and a per-seed offset keeps every epoch of a run distinct.
An epoch holds num_items // (batch_size * world_size) global batches; the tail that does not fill a global
batch is dropped, so epochs never straddle. Global batch k of an epoch is split into world_size consecutive
slices of batch_size, one per rank. Resuming at any step therefore reproduces the same batches.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch

from ..errors import UserError

SEED_BITS = 32  # torch.Generator (CPU) uses only the low 32 bits of manual_seed's argument


# 32-bit generator seed of (seed, epoch): a hash of the run seed plus the epoch, so epochs never collide.
def epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.blake2b(str(seed).encode(), digest_size=SEED_BITS // 8).digest()
    return (int.from_bytes(digest, "little") + epoch) % (1 << SEED_BITS)


# The permutation of epoch `epoch` (cached: consecutive steps of one epoch share it; callers get clones).
@lru_cache(maxsize=2)
def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_items, generator=generator)


def _check(step: int, batch_size: int, num_items: int, rank: int, world_size: int) -> None:
    if step < 0 or batch_size < 1 or world_size < 1:
        raise UserError(
            f"need step >= 0, batch_size >= 1 and world_size >= 1, got {step}, {batch_size}, {world_size}"
        )
    if not 0 <= rank < world_size:
        raise UserError(f"rank must be in [0, {world_size}), got {rank}")
    if num_items < batch_size * world_size:
        raise UserError(
            f"the data has {num_items} items, fewer than one global batch ({batch_size} x {world_size} ranks)"
        )


def batch_indices(
    step: int, batch_size: int, num_items: int, seed: int, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """Indices (int64 [batch_size]) of the items rank `rank` trains on at optimizer step `step`.

    Args:
        step: optimizer step, counted from 0 over the whole run.
        batch_size: items per rank per step (the global batch is batch_size * world_size).
        num_items: length of the data set.
        seed: run seed (any integer); the epoch permutation is seeded from (seed, epoch).
        rank: this process's rank in [0, world_size).
        world_size: number of data-parallel processes.
    """
    _check(step, batch_size, num_items, rank, world_size)
    global_batch = batch_size * world_size
    steps_per_epoch = num_items // global_batch
    epoch, position = divmod(step, steps_per_epoch)
    if epoch >= 1 << SEED_BITS:
        raise UserError(f"step {step} is beyond 2**32 epochs")
    start = position * global_batch + rank * batch_size
    return epoch_permutation(num_items, seed, epoch)[start : start + batch_size].clone()
