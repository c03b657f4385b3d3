"""Progress bars of every phase longer than a few seconds, throttled in logs as the trainer's bar is."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def bar(total: int | None, desc: str, unit: str = "it", disable: bool = False) -> tqdm:
    """A bar on stderr; a log file (not a terminal) gets a line every 30 s, not every update, and the final one (a
    terminal's bar disappears when done, under the trainer's own)."""
    terminal = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=not terminal,
                mininterval=1 if terminal else 30)  # fmt: skip


def tracked(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`items` with a bar."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with bar(total if total is not None else len(items), desc, unit) as shown:
        for item in items:
            yield item
            shown.update(1)


class Ticking:
    """A NativeModel whose F ticks a bar once per call (the teacher's sampler: one tick per network evaluation)."""

    def __init__(self, model, shown: tqdm):
        self.model, self.shown = model, shown

    def F(self, *args, **kwargs):
        out = self.model.F(*args, **kwargs)
        self.shown.update(1)
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)
