"""Measuring memory on the CPU: the peak of allocated tensor bytes over a call, and the bytes a set of tensors holds.

`peak_allocated_bytes` integrates the allocator's events recorded by the PyTorch profiler (`profile_memory=True`):
every allocation and free of tensor storage, in order, so the running sum is the live tensor memory and its maximum
is the CPU analogue of `torch.cuda.max_memory_allocated` (no allocator caching, no Python objects, no RSS noise). It
counts allocations made inside the call, on top of what was live when it started.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Largest amount of tensor memory allocated by `fn()` at any moment, above the memory live at its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.device_type() == torch.autograd.DeviceType.CPU and e.nbytes() != 0]  # fmt: skip
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind the tensors (a DTensor counts its local shard, padding included)."""
    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storage = local.untyped_storage()
        storages[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(storages.values())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
