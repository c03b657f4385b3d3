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


class PromptCache:
    """`cache(prompts, key)` = encode(prompts) for batch-first conditions, each distinct (prompt, key) encoded once;
    `key` names what else the inputs depend on (e.g. the resolution SDXL's time ids carry)."""

    def __init__(self, encode: Callable[[list[str]], Condition], max_bytes: int = PROMPT_CACHE_BYTES):
        self.encode, self.max_bytes = encode, max_bytes
        self.rows: OrderedDict[tuple, Condition] = OrderedDict()
        self.bytes = 0

    def __call__(self, prompts: Sequence[str], key: Hashable = None) -> Condition:
        distinct = list(dict.fromkeys(prompts))
        for prompt in distinct:  # the batch's cached prompts become the most recent before anything is dropped
            if (prompt, key) in self.rows:
                self.rows.move_to_end((prompt, key))
        rows = {prompt: self.rows.get((prompt, key)) for prompt in distinct}
        missing = [prompt for prompt, row in rows.items() if row is None]
        if missing:
            with torch.no_grad():
                encoded = self.encode(missing)
            for i, prompt in enumerate(missing):
                rows[prompt] = condition_row(encoded, i)
                self.add((prompt, key), rows[prompt])
        return concat_conditions(*(rows[prompt] for prompt in prompts))

    def add(self, entry: tuple, row: Condition) -> None:
        """Keep `row` as the most recent entry (unless it alone exceeds the budget), dropping the least recent ones
        over the budget."""
        size = condition_bytes(row)
        if size > self.max_bytes:
            return
        self.rows[entry] = row
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self.rows.popitem(last=False)
            self.bytes -= condition_bytes(dropped)
