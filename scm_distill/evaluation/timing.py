"""Wall-clock measurement done right: warm-up, synchronisation, several repeats, the median, peak memory."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    repeats: int
    peak_gib: float | None  # peak device memory during the timed calls (CUDA only)
    max_ms: float = math.nan

    def as_dict(self) -> dict:
        return {"median_ms": round(self.median_ms, 4), "min_ms": round(self.min_ms, 4),
                "max_ms": round(self.max_ms, 4), "repeats": self.repeats,
                "peak_gib": None if self.peak_gib is None else round(self.peak_gib, 4)}  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> Timing:
    """Median wall time of `fn()` with the device synchronised around every call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Timing(statistics.median(times), min(times), repeats, peak, max(times))
