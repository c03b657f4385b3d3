"""Batch-1 latency of a sampler: the median wall time of a call, end to end and inside its denoiser's forward calls."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def median_ms(call: Callable[[int], object], network: torch.nn.Module, repeats: int) -> dict:
    """Median milliseconds of `call(seed)` end to end and of the part spent inside `network`'s forward calls, over
    `repeats` calls after one warm-up call."""
    inside, starts = [], []
    pre = network.register_forward_pre_hook(lambda module, args: starts.append(time.perf_counter()))
    post = network.register_forward_hook(lambda module, args, out: inside.append(time.perf_counter() - starts.pop()))
    totals, networks = [], []
    try:
        for i in range(repeats + 1):  # the first call warms up
            inside.clear()
            started = time.perf_counter()
            with torch.no_grad():
                call(i)
            if i:
                totals.append(time.perf_counter() - started)
                networks.append(sum(inside))
    finally:
        pre.remove()
        post.remove()
    return {"end_to_end_ms": 1000 * sorted(totals)[len(totals) // 2],
            "network_ms": 1000 * sorted(networks)[len(networks) // 2]}  # fmt: skip
