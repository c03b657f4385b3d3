"""The network inputs of each distinct prompt, encoded once and kept between steps.

A teacher's text encoders are frozen, so a prompt gives the same network inputs at every step. A training set's
captions repeat (class captions, a fine-tune's few thousand prompts, every epoch), and encoding them again each step
can cost more than the step itself: on the Fashion-MNIST Sana teacher the Gemma encoder took 3.4 of a step's 4.4 s.
`PromptCache` encodes only the prompts of a batch it has not seen (each once, in one call) and keeps the rows of
each prompt, least recently used dropped first, within a byte budget - on datasets of unique captions it only
removes the duplicates within a batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..guidance import concat_conditions
from ..parameterization import Condition

PROMPT_CACHE_BYTES = 256 * 2**20  # 256 MiB: ~90 Sana prompts of 300 Gemma tokens, thousands of CLIP ones


def condition_row(condition: Any, i: int) -> Any:
    """Row i of a batch-first condition as a batch of one (a copy, so that it does not hold the whole batch)."""
    if isinstance(condition, Tensor):
        return condition[i : i + 1].clone()
    if isinstance(condition, dict):
        return {key: condition_row(value, i) for key, value in condition.items()}
    return condition


def condition_bytes(condition: Any) -> int:
    if isinstance(condition, Tensor):
        return condition.numel() * condition.element_size()
    if isinstance(condition, dict):
        return sum(condition_bytes(value) for value in condition.values())
    return 0


def stack_rows(rows: Sequence[Any]) -> Any:
    """Batches of one stacked into one batch (tensors concatenated once, non-tensor values must agree)."""
    first = rows[0]
    if isinstance(first, Tensor):
        return torch.cat(list(rows))
    if isinstance(first, dict):
        return {key: stack_rows([row[key] for row in rows]) for key in first}
    for row in rows[1:]:
        concat_conditions(first, row)  # the one-sentence error when they differ
    return first


class PromptCache:
    """`cache(prompts, key)` = encode(prompts) for batch-first conditions, each distinct (prompt, key) encoded once;
    `key` names what else the inputs depend on (e.g. the resolution SDXL's time ids carry)."""

    def __init__(self, encode: Callable[[list[str]], Condition], max_bytes: int = PROMPT_CACHE_BYTES):
        self.encode, self.max_bytes = encode, max_bytes
        self.rows: OrderedDict[tuple, Condition] = OrderedDict()
        self.bytes = 0

    def __call__(self, prompts: Sequence[str], key: Hashable = None) -> Condition:
        prompts = list(prompts)
        missing = [p for p in dict.fromkeys(prompts) if (p, key) not in self.rows]
        fresh = {}
        if missing:
            with torch.no_grad():
                encoded = self.encode(missing)
            fresh = {p: condition_row(encoded, i) for i, p in enumerate(missing)}
        rows = [fresh[p] if p in fresh else self.rows[(p, key)] for p in prompts]
        for p in dict.fromkeys(prompts):
            self.keep((p, key), fresh.get(p))
        return stack_rows(rows)

    def keep(self, entry: tuple, row: Condition | None) -> None:
        """Mark `entry` most recently used (adding `row` when new), then drop the least recent over the budget."""
        if row is None:
            self.rows.move_to_end(entry)
            return
        size = condition_bytes(row)
        if size > self.max_bytes:
            return
        self.rows[entry] = row
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self.rows.popitem(last=False)
            self.bytes -= condition_bytes(dropped)

    def clear(self) -> None:
        self.rows.clear()
        self.bytes = 0
